"""Database ↔ FAISS index agreement, index type switch, locking and identity clustering.

Real SQLite files and real FAISS indexes; the vectors are random unit vectors grouped like
re-ID embeddings (several noisy views around each person's centre), so no model is needed.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
from pathlib import Path

import faiss
import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.schema import CreateTable

from reid_app.commands.stats import collect_stats
from reid_app.config import AppConfig, parse_camera_id
from reid_app.errors import ReidAppError
from reid_app.identities import agglomerative_clusters, compute_identities
from reid_app.index import (
    INDEX_TYPE_FLAT,
    INDEX_TYPE_IVF,
    K_FACTORS,
    IndexManager,
    index_ids,
    index_paths,
    ivf_nlist,
    reduced_dim,
    refine_parts,
)
from reid_app.store import (
    Base,
    Database,
    DatabaseInfo,
    Detection,
    Track,
    Video,
    bytes_to_vectors,
    check_model_identity,
    delete_tracks,
    utc_now,
    vector_to_bytes,
)

DIM = 128
MODEL = ("test-model", "ab" * 32, DIM)


def clustered_unit_vectors(people: int, views: int, dim: int, spread: float, seed: int) -> np.ndarray:
    """``people × views`` unit vectors: each person's views scattered around a random centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((people, views, dim)) * spread / np.sqrt(dim)
    vectors = (centres[:, None, :] + noise).reshape(people * views, dim)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_db(url: str, tmp_path: Path, **overrides) -> tuple[AppConfig, Database]:
    """A database at ``url`` (SQLite or PostgreSQL), its data folder ``tmp_path``."""
    config = AppConfig(db_url=url, data_dir=tmp_path, **overrides)
    db = Database(config, create=True)
    db.ensure_info()

    def set_model(session) -> None:
        info = session.get(DatabaseInfo, 1)
        info.model_name, info.model_weights_sha256, info.model_dim = MODEL
        info.model_is_trained = False

    db.write(set_model)
    return config, db


def add_tracks(db: Database, vectors: np.ndarray, camera: int = 1, sha: str = "0" * 64) -> list[int]:
    """One video, one track per vector (each with one detection of the same vector)."""

    def work(session) -> list[int]:
        video = Video(
            path="/videos/x.mp4",
            sha256=sha,
            camera_id=camera,
            fps=25.0,
            frame_count=100,
            width=640,
            height=480,
            sample_fps=2.0,
            start_time=utc_now(),
            status="complete",
            last_committed_frame=99,
            detector="test",
            created_at=utc_now(),
        )
        session.add(video)
        session.flush()
        ids = []
        for number, vector in enumerate(vectors):
            track = Track(
                video_id=video.id,
                camera_id=camera,
                tracker_id=number + 1,
                first_frame=number,
                last_frame=number,
                first_timestamp_s=number / 25,
                last_timestamp_s=number / 25,
                num_crops=1,
                embedding=vector_to_bytes(vector),
            )
            session.add(track)
            session.flush()
            session.add(
                Detection(
                    track_id=track.id,
                    video_id=video.id,
                    camera_id=camera,
                    frame_index=number,
                    timestamp_s=number / 25,
                    x1=0,
                    y1=0,
                    x2=10,
                    y2=20,
                    score=0.9,
                    thumbnail_path="t.jpg",
                    embedding=vector_to_bytes(vector),
                )
            )
            ids.append(track.id)
        return ids

    return db.write(work)


def db_track_ids(db: Database) -> np.ndarray:
    with db.read() as session:
        return np.sort(np.asarray(session.scalars(select(Track.id)).all(), dtype=np.int64))


def test_vectors_round_trip_through_the_database(fresh_db_url: str, tmp_path: Path) -> None:
    _, db = make_db(fresh_db_url, tmp_path)
    vectors = clustered_unit_vectors(3, 4, DIM, 0.3, seed=1)
    add_tracks(db, vectors)
    with db.read() as session:
        blobs = session.scalars(select(Track.embedding).order_by(Track.id)).all()
    np.testing.assert_array_equal(bytes_to_vectors(list(blobs), DIM), vectors)


def test_sync_builds_exact_index_that_finds_each_vector(fresh_db_url: str, tmp_path: Path) -> None:
    config, db = make_db(fresh_db_url, tmp_path)
    vectors = clustered_unit_vectors(20, 5, DIM, 0.5, seed=2)
    ids = add_tracks(db, vectors)
    gallery, report = IndexManager(db, config).sync("tracks")
    assert report.rebuilt and gallery.index_type == INDEX_TYPE_FLAT
    np.testing.assert_array_equal(index_ids(gallery.index), np.asarray(ids))
    scores, found = gallery.search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    sidecar = json.loads(index_paths(IndexManager(db, config).index_dir, "tracks")[1].read_text())
    assert sidecar["ntotal"] == len(ids) and sidecar["synced_id"] == max(ids)
    # A second process opening the same files finds them in agreement: nothing to do.
    _, again = IndexManager(db, config).sync("tracks")
    assert not again.changed


def test_deleted_index_file_is_rebuilt_from_the_database(fresh_db_url: str, tmp_path: Path) -> None:
    config, db = make_db(fresh_db_url, tmp_path)
    vectors = clustered_unit_vectors(10, 3, DIM, 0.5, seed=3)
    ids = add_tracks(db, vectors)
    first, _ = IndexManager(db, config).sync("detections")
    before = first.search(vectors[:5], 5)
    index_paths(IndexManager(db, config).index_dir, "detections")[0].unlink()
    gallery, report = IndexManager(db, config).sync("detections")
    assert report.rebuilt and "no index file" in report.reason
    assert gallery.ntotal == len(ids)
    after = gallery.search(vectors[:5], 5)
    np.testing.assert_array_equal(before[1], after[1])


def test_catch_up_reads_only_new_rows_and_the_deletion_log(fresh_db_url: str, tmp_path: Path) -> None:
    config, db = make_db(fresh_db_url, tmp_path)
    ids = add_tracks(db, clustered_unit_vectors(5, 4, DIM, 0.5, seed=4))
    manager = IndexManager(db, config)
    manager.sync("tracks")
    # Rows committed by another host, and rows deleted by one (a redone video, prune, forget).
    new_ids = add_tracks(db, clustered_unit_vectors(2, 3, DIM, 0.5, seed=5), sha="1" * 64)
    gone = ids[:3]
    db.write(lambda session: delete_tracks(session, gone))
    assert manager.lag("tracks") == {"rows_behind": len(new_ids), "deletions_behind": len(gone), "needs_build": None}
    gallery, report = IndexManager(db, config).sync("tracks")
    assert not report.rebuilt
    assert report.removed == len(gone) and report.added == len(new_ids)
    np.testing.assert_array_equal(index_ids(gallery.index), db_track_ids(db))
    assert manager.lag("tracks") == {"rows_behind": 0, "deletions_behind": 0, "needs_build": None}
    # A vector past what the sidecar says was synced (a file written by other code) is not trusted.
    gallery.index.add_with_ids(clustered_unit_vectors(1, 1, DIM, 0.0, seed=99), np.array([max(new_ids) + 1000]))
    manager._save(gallery)
    rebuilt, report = IndexManager(db, config).sync("tracks")
    assert report.rebuilt and "synced_id" in report.reason
    np.testing.assert_array_equal(index_ids(rebuilt.index), db_track_ids(db))


def test_index_of_another_database_is_rebuilt(fresh_db_url: str, tmp_path: Path) -> None:
    config, db = make_db(fresh_db_url, tmp_path)
    add_tracks(db, clustered_unit_vectors(4, 2, DIM, 0.5, seed=6))
    IndexManager(db, config).sync("tracks")
    old_folder = IndexManager(db, config).index_dir
    # The database is recreated (same ids 1..N) but the old index files stay in the data folder.
    Base.metadata.drop_all(db.engine)
    db.dispose()
    config, db = make_db(fresh_db_url, tmp_path)
    vectors = clustered_unit_vectors(4, 2, DIM, 0.5, seed=7)
    ids = add_tracks(db, vectors)
    gallery, report = IndexManager(db, config).sync("tracks")
    # Its index lives in a folder of its own (named by the new database's uuid): built afresh.
    assert report.rebuilt and "no index file" in report.reason
    assert IndexManager(db, config).index_dir != old_folder and old_folder.exists()
    _, found = gallery.search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], ids)


def test_switch_to_ivf_keeps_exact_top1(fresh_db_url: str, tmp_path: Path) -> None:
    """Lowered threshold: 2,400 vectors (300 people × 8 views) are searched through IVF-SQ8."""
    config, db = make_db(fresh_db_url, tmp_path, ivf_threshold=1000)
    gallery_vectors = clustered_unit_vectors(300, 8, DIM, 0.6, seed=8)
    ids = np.asarray(add_tracks(db, gallery_vectors))
    gallery, report = IndexManager(db, config).sync("tracks")
    assert report.rebuilt and gallery.index_type == INDEX_TYPE_IVF
    assert gallery.meta["nlist"] == ivf_nlist(len(ids))
    assert gallery.meta["recall_at_10"] >= 0.95
    # Queries: new noisy views of stored people (a person seen again).
    rng = np.random.default_rng(9)
    picks = rng.choice(len(ids), size=100, replace=False)
    queries = gallery_vectors[picks] + rng.standard_normal((100, DIM)).astype(np.float32) * 0.2 / np.sqrt(DIM)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    exact.add_with_ids(gallery_vectors, ids)
    _, exact_top = exact.search(queries, 1)
    _, ivf_top = gallery.search(queries, 1)
    np.testing.assert_array_equal(ivf_top[:, 0], exact_top[:, 0])
    # Reopened from disk, it is still IVF and in agreement; new rows are added to it.
    more = add_tracks(db, clustered_unit_vectors(5, 2, DIM, 0.6, seed=10), sha="2" * 64)
    reopened, report = IndexManager(db, config).sync("tracks")
    assert reopened.index_type == INDEX_TYPE_IVF and not report.rebuilt and report.added == len(more)
    np.testing.assert_array_equal(index_ids(reopened.index), db_track_ids(db))
    # `reid-app stats` reports the switch.
    stats = collect_stats(config)["indexes"]["tracks"]
    assert stats["type"] == INDEX_TYPE_IVF and stats["ivf_threshold"] == 1000
    assert stats["nlist"] == gallery.meta["nlist"] and stats["recall_at_10"] >= 0.95


def noisy_views(vectors: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    """``count`` new unit views of randomly picked rows of ``vectors`` (a person seen again)."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), size=count, replace=False)]
    queries = picked + rng.standard_normal(picked.shape).astype(np.float32) * noise / np.sqrt(picked.shape[1])
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def db_track_vectors(db: Database) -> tuple[np.ndarray, np.ndarray]:
    with db.read() as session:
        rows = session.execute(select(Track.id, Track.embedding).order_by(Track.id)).all()
    return np.asarray([r[0] for r in rows], dtype=np.int64), bytes_to_vectors([r[1] for r in rows], DIM)


def test_approximate_index_keeps_exact_top1_through_sync_and_reopening(fresh_db_url: str, tmp_path: Path) -> None:
    """The large-gallery type (PCA candidates re-scored with full vectors), with a lowered
    threshold: rows deleted and added behind its back are synced, and every reopened copy
    answers like exact search."""
    config, db = make_db(fresh_db_url, tmp_path, ivf_threshold=1000)
    ids = np.asarray(add_tracks(db, clustered_unit_vectors(250, 8, DIM, 0.6, seed=20)))
    gallery, report = IndexManager(db, config).sync("tracks")
    assert report.rebuilt and gallery.index_type == INDEX_TYPE_IVF
    assert gallery.meta["k_factor"] in K_FACTORS and gallery.meta["recall_at_10"] >= 0.95
    candidates_index, store = refine_parts(gallery.index)
    assert faiss.extract_index_ivf(candidates_index).d == reduced_dim(DIM) < DIM  # candidates: reduced space
    assert store.d == DIM  # re-scoring: full vectors
    # A redone video's rows are deleted, a new camera's rows committed, neither synced yet.
    gone = ids[:40]
    db.write(lambda session: delete_tracks(session, gone.tolist()))
    new_ids = np.asarray(add_tracks(db, clustered_unit_vectors(30, 4, DIM, 0.6, seed=21), camera=2, sha="7" * 64))
    reopened, report = IndexManager(db, config).sync("tracks")
    assert reopened.index_type == INDEX_TYPE_IVF and not report.rebuilt
    assert report.removed == len(gone) and report.added == len(new_ids)
    candidates_index, store = refine_parts(reopened.index)
    np.testing.assert_array_equal(index_ids(reopened.index), db_track_ids(db))
    np.testing.assert_array_equal(np.sort(faiss.vector_to_array(store.id_map)), db_track_ids(db))
    assert candidates_index.ntotal == store.ntotal == reopened.ntotal
    # Another process reopening the saved file finds it in agreement and searches like exact.
    third, again = IndexManager(db, config).sync("tracks")
    assert not again.changed and third is not reopened
    stored_ids, stored_vectors = db_track_vectors(db)
    queries = noisy_views(stored_vectors, 100, 0.2, seed=22)
    exact_scores = queries @ stored_vectors.T
    scores, found = third.search(queries, 1)
    np.testing.assert_array_equal(found[:, 0], stored_ids[exact_scores.argmax(axis=1)])
    np.testing.assert_allclose(scores[:, 0], exact_scores.max(axis=1), atol=0.01)  # SQ8 re-scoring
    _, near_gone = third.search(clustered_unit_vectors(250, 8, DIM, 0.6, seed=20)[:40], 10)
    assert not set(near_gone.ravel().tolist()) & set(gone.tolist())
    _, on_camera_2 = third.search(queries[:10], 5, allowed_ids=new_ids)
    assert set(on_camera_2.ravel().tolist()) <= set(new_ids.tolist())
    assert (on_camera_2 >= 0).all()


def test_approximate_index_with_disagreeing_parts_is_rebuilt(fresh_db_url: str, tmp_path: Path) -> None:
    config, db = make_db(fresh_db_url, tmp_path, ivf_threshold=1000)
    add_tracks(db, clustered_unit_vectors(150, 8, DIM, 0.6, seed=23))
    manager = IndexManager(db, config)
    gallery, _ = manager.sync("tracks")
    # Only the full-vector store loses a row: the candidate index still returns it.
    _, store = refine_parts(gallery.index)
    store.remove_ids(faiss.IDSelectorBatch(np.asarray([int(index_ids(gallery.index)[0])], dtype=np.int64)))
    manager._save(gallery)
    rebuilt, report = IndexManager(db, config).sync("tracks")
    assert report.rebuilt and "different rows" in report.reason
    _, store = refine_parts(rebuilt.index)
    np.testing.assert_array_equal(np.sort(faiss.vector_to_array(store.id_map)), db_track_ids(db))


def test_camera_filter_restricts_results(fresh_db_url: str, tmp_path: Path) -> None:
    config, db = make_db(fresh_db_url, tmp_path)
    vectors = clustered_unit_vectors(2, 4, DIM, 0.3, seed=11)
    cam1 = add_tracks(db, vectors[:4], camera=1, sha="3" * 64)
    cam2 = add_tracks(db, vectors[4:], camera=2, sha="4" * 64)
    gallery, _ = IndexManager(db, config).sync("tracks")
    _, found = gallery.search(vectors[:1], 8, allowed_ids=np.asarray(cam2))
    assert set(found[0][found[0] >= 0].tolist()) == set(cam2)
    assert not set(found[0].tolist()) & set(cam1)


def _set_model(session) -> None:
    info = session.get(DatabaseInfo, 1)
    if info.model_name is None:
        info.model_name, info.model_weights_sha256, info.model_dim = MODEL
        info.model_is_trained = False


def _writer_process(db_url: str, data_dir: Path, seed: int, rounds: int) -> None:
    config = AppConfig(db_url=db_url, data_dir=data_dir)
    db = Database(config, create=True)  # both processes create the same new database at once
    db.ensure_info()
    db.write(_set_model)
    manager = IndexManager(db, config)
    for number in range(rounds):
        add_tracks(db, clustered_unit_vectors(2, 2, DIM, 0.5, seed=seed * 100 + number), sha=f"{seed}{number:063d}")
        manager.sync("tracks")


def test_two_processes_writing_and_syncing_never_lose_vectors(fresh_db_url: str, tmp_path: Path) -> None:
    config = AppConfig(db_url=fresh_db_url, data_dir=tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer_process, args=(config.db_url, tmp_path, seed, 12)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
        assert worker.exitcode == 0
    db = Database(config)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Track)) == 2 * 12 * 4
    gallery, report = IndexManager(db, config).sync("tracks")
    assert not report.changed  # the last writer left the index in agreement
    np.testing.assert_array_equal(index_ids(gallery.index), db_track_ids(db))


def test_model_identity_mismatch_is_refused(fresh_db_url: str, tmp_path: Path) -> None:
    _, db = make_db(fresh_db_url, tmp_path)
    info = db.info()
    check_model_identity(info, *MODEL)
    with pytest.raises(ReidAppError, match="different models"):
        check_model_identity(info, "test-model", "cd" * 32, DIM)
    with pytest.raises(ReidAppError, match="different models"):
        check_model_identity(info, "other", "ab" * 32, DIM)


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_schema_is_portable_sql(dialect: str) -> None:
    """The ORM layer compiles for server databases too (no SQLite-only SQL)."""
    module = importlib.import_module(f"sqlalchemy.dialects.{dialect}")
    for table in Base.metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=module.dialect()))
        assert table.name in ddl
        if dialect == "postgresql":
            assert "AUTOINCREMENT" not in ddl and ("BYTEA" in ddl or "embedding" not in ddl)


def test_read_commands_do_not_create_a_database(tmp_path: Path) -> None:
    config = AppConfig(db_url=f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(ReidAppError, match="empty"):
        Database(config)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5", "", "٣"])
def test_camera_id_must_be_a_positive_integer(text: str) -> None:
    with pytest.raises(ReidAppError, match="positive integer"):
        parse_camera_id(text)
    assert parse_camera_id("12") == 12


def test_agglomerative_clustering_recovers_people_and_respects_cannot_link() -> None:
    vectors = clustered_unit_vectors(6, 5, DIM, 0.4, seed=12)
    labels = agglomerative_clusters(vectors, threshold=0.3)
    expected = np.repeat(np.arange(6), 5)
    # Same partition as the true people (label numbers may differ).
    assert len(set(labels.tolist())) == 6
    for person in range(6):
        assert len(set(labels[expected == person].tolist())) == 1
    cannot = np.zeros((30, 30), dtype=bool)
    cannot[0, 1] = cannot[1, 0] = True
    split = agglomerative_clusters(vectors, threshold=0.3, cannot_link=cannot)
    assert split[0] != split[1]
    complete = agglomerative_clusters(vectors, threshold=0.3, linkage="complete")
    assert len(set(complete.tolist())) >= 6


def test_identities_are_stored_per_track(fresh_db_url: str, tmp_path: Path) -> None:
    _, db = make_db(fresh_db_url, tmp_path)
    vectors = clustered_unit_vectors(3, 4, DIM, 0.4, seed=13)
    add_tracks(db, vectors[:6], camera=1, sha="5" * 64)
    add_tracks(db, vectors[6:], camera=2, sha="6" * 64)
    summaries = compute_identities(db, threshold=0.3)
    assert len(summaries) == 3
    with db.read() as session:
        stored = session.scalars(select(Track.identity_id).order_by(Track.id)).all()
    assert stored == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    # The middle person (tracks 5-8) was seen by both cameras.
    assert sorted(s.cameras for s in summaries)[0] == [1]
    assert [1, 2] in [s.cameras for s in summaries]
