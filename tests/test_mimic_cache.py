"""Where mimics come from: the rotating key pool, the SQLite disk cache, and reuse across restarts."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from bumper.certs import ca as ca_files
from bumper.certs import keys
from bumper.certs.keypool import KeyPool, PoolSettings
from bumper.certs.mimicdb import DB_FILE, SqliteMimicStore, StoredMimic
from bumper.certs.mimicstore import MimicStore
from tests import pki
from tests.conftest import Bumper, Upstream, client_tls_context, open_tunnel

DAY = pki.DAY


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="module")
def upstream_root() -> pki.Authority:
    return pki.Authority.root("upstream issuing CA")


def upstream_cert(root: pki.Authority, name: str = "cached.test") -> x509.Certificate:
    return root.leaf(name, key=pki.ec_key()).cert


# --- the key pool -------------------------------------------------------------------------------


def test_a_key_serves_many_mimics_then_rotates_after_max_uses(runner: asyncio.Runner) -> None:
    pool = KeyPool(PoolSettings(max_uses=3, warm=()))
    served = [runner.run(pool.key_for(keys.P256)) for _ in range(7)]
    assert [served.index(k) for k in served] == [0, 0, 0, 3, 3, 3, 6]


def test_a_key_rotates_after_max_age(runner: asyncio.Runner) -> None:
    now = [1000.0]
    pool = KeyPool(PoolSettings(max_age=60, warm=()), clock=lambda: now[0])
    first = runner.run(pool.key_for(keys.P256))
    now[0] += 59
    assert runner.run(pool.key_for(keys.P256)) is first
    now[0] += 2
    assert runner.run(pool.key_for(keys.P256)) is not first


def test_many_waiters_on_a_cold_pool_share_one_key(runner: asyncio.Runner) -> None:
    """A burst of first contacts for one key type makes one key, not one each."""
    pool = KeyPool(PoolSettings(warm=()))

    async def burst() -> set[int]:
        served = await asyncio.gather(*(pool.key_for(keys.KeySpec("rsa", size=2048)) for _ in range(30)))
        return {id(p.key) for p in served}

    try:
        assert len(runner.run(burst())) == 1
    finally:
        pool.close()


def test_a_dead_key_worker_is_replaced(runner: asyncio.Runner) -> None:
    pool = KeyPool(PoolSettings(max_uses=1, warm=()))
    try:
        runner.run(pool.key_for(keys.RSA2048))
        workers = multiprocessing.active_children()
        assert workers, "no worker process to kill"
        for child in workers:
            child.kill()
            child.join(10)
        key = runner.run(pool.key_for(keys.RSA2048)).key  # the spare died with the worker
        assert isinstance(key, rsa.RSAPrivateKey)
    finally:
        pool.close()


def test_rsa_keys_are_made_in_a_worker_process_of_the_asked_size(runner: asyncio.Runner) -> None:
    pool = KeyPool(PoolSettings(warm=()))
    try:
        key = runner.run(pool.key_for(keys.KeySpec("rsa", size=3072))).key
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
        assert multiprocessing.active_children(), "no worker process was used"
    finally:
        pool.close()


def test_making_an_rsa_4096_key_never_blocks_the_event_loop(runner: asyncio.Runner) -> None:
    """The loop keeps ticking (no gap over 50 ms) while the pool makes two RSA-4096 keys."""
    pool = KeyPool(PoolSettings(max_uses=1, warm=()))

    async def scenario() -> float:
        worst, done = 0.0, asyncio.Event()

        async def ticker() -> None:
            nonlocal worst
            loop = asyncio.get_running_loop()
            while not done.is_set():
                start = loop.time()
                await asyncio.sleep(0.005)
                worst = max(worst, loop.time() - start - 0.005)

        tick = asyncio.create_task(ticker())
        for _ in range(2):
            await pool.key_for(keys.KeySpec("rsa", size=4096))
        done.set()
        await tick
        return worst

    try:
        assert runner.run(scenario()) < 0.05
    finally:
        pool.close()


# --- the disk cache -----------------------------------------------------------------------------


def test_sqlite_store_keys_rows_by_upstream_mode_and_ca(tmp_path: Path) -> None:
    db = SqliteMimicStore(tmp_path / DB_FILE)
    row = StoredMimic(b"cert", b"key")
    db.put(b"up", "ca", "CA1", row)
    assert db.get(b"up", "ca", "CA1") == row
    assert db.get(b"up", "ca", "CA2") is None  # another CA
    assert db.get(b"up", "untrusted", "CA1") is None  # another signing mode
    assert db.get(b"other", "ca", "CA1") is None  # another upstream certificate
    assert db.forget_other_cas("CA2") == 1 and len(db) == 0
    assert (tmp_path / DB_FILE).stat().st_mode & 0o077 == 0  # it holds private keys


ROW = StoredMimic(b"c" * 1000, b"k" * 200)


def row_bytes(db: SqliteMimicStore, upstream: bytes = b"\0" * 4) -> int:
    return db.row_bytes(upstream, "ca", "CA", ROW)


def test_sqlite_store_stays_within_its_bytes(tmp_path: Path) -> None:
    """Trimmed by itself (every 32nd of the cap written), the least recently written rows first."""
    db = SqliteMimicStore(tmp_path / DB_FILE)
    db.max_bytes = 100 * row_bytes(db)
    for i in range(300):
        db.put(i.to_bytes(4, "big"), "ca", "CA", ROW)
        assert db.stored_bytes() <= db.max_bytes + db.max_bytes // 32
    db.prune()
    assert len(db) == 100 and db.stored_bytes() == 100 * row_bytes(db)
    assert db.get((299).to_bytes(4, "big"), "ca", "CA") is not None  # the newest are kept
    assert db.get((199).to_bytes(4, "big"), "ca", "CA") is None


def test_a_row_above_a_64th_of_the_cap_is_not_stored(tmp_path: Path) -> None:
    db = SqliteMimicStore(tmp_path / DB_FILE)
    db.max_bytes = 64 * row_bytes(db)
    db.put(b"fits", "ca", "CA", ROW)
    large = StoredMimic(ROW.cert_der + b"c", ROW.key_der)
    db.put(b"larg", "ca", "CA", large)
    assert db.get(b"fits", "ca", "CA") == ROW
    assert db.get(b"larg", "ca", "CA") is None
    assert db.stored_bytes() == row_bytes(db)


def test_a_file_over_the_cap_is_trimmed_when_opened(tmp_path: Path) -> None:
    """A file written under a higher cap (or by count, before caps were in bytes) shrinks at once."""
    db = SqliteMimicStore(tmp_path / DB_FILE)
    for i in range(50):
        db.put(i.to_bytes(4, "big"), "ca", "CA", ROW)
    db.close()
    smaller = SqliteMimicStore(tmp_path / DB_FILE, max_bytes=10 * row_bytes(db))
    assert len(smaller) == 10 and smaller.stored_bytes() == 10 * row_bytes(db)
    assert smaller.get((49).to_bytes(4, "big"), "ca", "CA") is not None


def _write_rows(path: str, first: int, count: int) -> None:
    db = SqliteMimicStore(Path(path))
    for i in range(first, first + count):
        db.put(i.to_bytes(4, "big"), "ca", "CA", StoredMimic(b"c" * 500, b"k" * 1200))
    db.close()


def test_several_processes_can_write_the_same_store(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_rows, args=(str(path), n * 200, 200)) for n in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    assert len(SqliteMimicStore(path)) == 600


# --- the store: memory, disk, mint --------------------------------------------------------------


def make_store(ca: ca_files.CertificateAuthority, db: Path) -> MimicStore:
    return MimicStore(ca, KeyPool(PoolSettings(warm=())), SqliteMimicStore(db))


def test_a_restart_reuses_the_mimic_from_disk(
    tmp_path: Path, upstream_root: pki.Authority, runner: asyncio.Runner
) -> None:
    ca = ca_files.create(tmp_path / "ca", now=pki.NOW - DAY)
    upstream = upstream_cert(upstream_root)
    first = runner.run(make_store(ca, tmp_path / DB_FILE).get(upstream))
    again = runner.run(make_store(ca, tmp_path / DB_FILE).get(upstream))  # a new process: empty memory
    assert again.cert == first.cert and again is not first
    changed = upstream_cert(upstream_root)  # same name, new certificate
    assert runner.run(make_store(ca, tmp_path / DB_FILE).get(changed)).cert != first.cert


def test_two_workers_minting_one_mimic_at_once_both_serve_the_one_stored_first(
    tmp_path: Path, upstream_root: pki.Authority, runner: asyncio.Runner
) -> None:
    """--workers: two processes that meet a new upstream at the same moment both mint; the first
    stored is what both serve from then on, the other's mint is dropped (a client's session resumes
    only on the mimic it was made with)."""
    ca = ca_files.create(tmp_path / "ca", now=pki.NOW - DAY)
    upstream = upstream_cert(upstream_root)
    one, other = make_store(ca, tmp_path / DB_FILE), make_store(ca, tmp_path / DB_FILE)

    async def both() -> list[x509.Certificate]:
        made = await asyncio.gather(one.get(upstream), other.get(upstream))
        return [m.cert for m in made]

    first, second = runner.run(both())
    assert one.lookups["minted"] == other.lookups["minted"] == 1  # both minted: neither found it stored
    assert first == second
    assert len(SqliteMimicStore(tmp_path / DB_FILE)) == 1
    assert runner.run(make_store(ca, tmp_path / DB_FILE).get(upstream)).cert == first  # and the disk has it


def test_a_new_ca_never_gets_an_old_mimic(tmp_path: Path, upstream_root: pki.Authority, runner: asyncio.Runner) -> None:
    old_ca = ca_files.create(tmp_path / "old", now=pki.NOW - DAY)
    new_ca = ca_files.create(tmp_path / "new", now=pki.NOW - DAY)
    upstream = upstream_cert(upstream_root)
    runner.run(make_store(old_ca, tmp_path / DB_FILE).get(upstream))
    store = make_store(new_ca, tmp_path / DB_FILE)
    store.start()
    try:
        made = runner.run(store.get(upstream))
    finally:
        store.close()
    made.cert.verify_directly_issued_by(new_ca.cert)
    assert len(SqliteMimicStore(tmp_path / DB_FILE)) == 1  # the old CA's row was forgotten


def test_a_disk_hit_is_checked_before_it_is_served(
    tmp_path: Path, upstream_root: pki.Authority, runner: asyncio.Runner
) -> None:
    """A row filed under the current CA but not signed by it (tampering, a bug) is minted again."""
    ca = ca_files.create(tmp_path / "ca", now=pki.NOW - DAY)
    impostor = ca_files.create(tmp_path / "impostor", now=pki.NOW - DAY)
    upstream = upstream_cert(upstream_root)
    forged = runner.run(MimicStore(impostor, KeyPool(PoolSettings(warm=()))).get(upstream))
    db = SqliteMimicStore(tmp_path / DB_FILE)
    db.put(upstream.fingerprint(hashes.SHA256()), "ca", ca.fingerprint, forged.stored())
    made = runner.run(make_store(ca, tmp_path / DB_FILE).get(upstream))
    assert made.cert != forged.cert
    made.cert.verify_directly_issued_by(ca.cert)


def test_concurrent_requests_for_one_upstream_mint_once(
    tmp_path: Path, upstream_root: pki.Authority, runner: asyncio.Runner
) -> None:
    ca = ca_files.create(tmp_path / "ca", now=pki.NOW - DAY)
    store = MimicStore(ca, KeyPool(PoolSettings(warm=())))
    upstream = upstream_cert(upstream_root)

    async def many() -> list[object]:
        return list(await asyncio.gather(*(store.get(upstream) for _ in range(20))))

    made = runner.run(many())
    assert all(m is made[0] for m in made)


# --- end to end: a restarted proxy serves the same mimic ----------------------------------------


def served_leaf(bumper: Bumper, upstream: Upstream) -> x509.Certificate:
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    with client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname=upstream.host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_restarted_proxy_serves_the_cached_mimic(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    first = start_bumper(ca_dir=tmp_path)
    before = served_leaf(first, upstream)
    first.process.stop()
    second = start_bumper(ca_dir=tmp_path)
    assert served_leaf(second, upstream) == before
    second.process.stop()
    off = start_bumper("--mimic-db", "0", ca_dir=tmp_path)
    assert served_leaf(off, upstream) != before  # without the disk cache it mints anew


def test_mimic_cache_0_keeps_none_in_memory(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    """The flag reaches the store: with neither cache, every connection gets a mimic minted anew."""
    bumper = start_bumper("--mimic-cache", "0", "--mimic-db", "0MiB", ca_dir=tmp_path)
    first, again = served_leaf(bumper, upstream), served_leaf(bumper, upstream)
    assert first.subject == again.subject and first.serial_number != again.serial_number
    kept = start_bumper("--mimic-cache", "4MiB", "--mimic-db", "0", ca_dir=tmp_path)
    assert served_leaf(kept, upstream) == served_leaf(kept, upstream)
