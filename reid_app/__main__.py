"""``python -m reid_app ...`` — the same commands as ``reid-app``; torchrun starts modules this way:
``torchrun --nproc-per-node 8 -m reid_app train --dataset msmt17 --data-root DIR``."""

from reid_app.cli import app

if __name__ == "__main__":
    app()
