"""Memory tiers: budgets and exact accounting, bit-exact copies between every pair of tiers with
gathers and scatters, exact byte counters per direction, the disk pool's reads and page cache. (Its
files' cleanup, Ctrl-C and kill -9 included: test_pools.py.)"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

from runner.memory.tiers import BudgetError, DiskPool, DiskTensor, Memory, Pool, Tier, TierBudgets, copy
from runner.units import GIB, format_bytes

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
DTYPES = [torch.float32, torch.float16, torch.int8]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so comparisons are bit-exact (NaN payloads and -0.0 included)."""
    return t.contiguous().view(torch.uint8)


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of `dtype` (every byte value, so NaNs and infs occur too)."""
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).view(shape)


@pytest.fixture
def memory(tmp_path: Path):
    with Memory(TierBudgets(gpu_bytes=4 * MIB, cpu_bytes=8 * MIB, disk_bytes=16 * MIB,
                            offload_dir=str(tmp_path / "offload")), device="cpu") as mem:
        yield mem


def _fill(memory: Memory, tier: Tier, data: torch.Tensor, label: str = "x") -> torch.Tensor | DiskTensor:
    """A buffer in `tier` holding `data` (written uncounted, so tests count only what they copy)."""
    buf = memory.pool(tier).alloc(data.shape, data.dtype, label)
    if isinstance(buf, DiskTensor):
        memory.disk.write(buf, data)
    else:
        buf.copy_(data)
    return buf


def _read(memory: Memory, buf: torch.Tensor | DiskTensor) -> torch.Tensor:
    return memory.disk.read(buf) if isinstance(buf, DiskTensor) else buf


# ---------------------------------------------------------------- budgets

def test_alloc_past_budget_raises_one_line_error_before_allocating():
    pool = Pool(Tier.GPU, 16 * MIB, "cpu")
    pool.alloc((int(12.9 * MIB) // 4,), torch.float32, "layer 2 weights")
    with pytest.raises(BudgetError) as err:
        pool.alloc((3 * MIB,), torch.float32, "layer 3 weights")
    assert str(err.value) == "gpu: layer 3 weights needs 12.0 MiB but only 3.1 MiB of the 16.0 MiB budget is free"
    assert "\n" not in str(err.value)
    assert (err.value.tier, err.value.nbytes, err.value.budget) == (Tier.GPU, 12 * MIB, 16 * MIB)
    assert pool.in_use == int(12.9 * MIB) // 4 * 4  # the refused allocation left no trace
    pool.alloc((pool.free_bytes(),), torch.int8, "exactly the rest")  # the budget itself is allowed
    assert pool.free_bytes() == 0


def test_disk_budget_and_unlimited(tmp_path: Path):
    with DiskPool(str(tmp_path), budget=100) as disk:
        disk.alloc((25,), torch.float32, "kv")
        with pytest.raises(BudgetError, match=r"^disk: more kv needs 1 B but only 0 B of the 100 B budget is free$"):
            disk.alloc((1,), torch.int8, "more kv")
    unlimited = Pool(Tier.CPU, None, "cpu")
    unlimited.alloc((MIB,), torch.int8, "big")
    assert unlimited.free_bytes() is None and unlimited.in_use == MIB


def test_peak_is_exact_over_alloc_free_sequences(tmp_path: Path):
    with DiskPool(str(tmp_path), budget=None) as disk:
        for pool in (Pool(Tier.CPU, 10 * MIB, "cpu"), disk):
            a = pool.alloc((1000,), torch.float32, "a")  # 4000
            b = pool.alloc((10, 10), torch.float16, "b")  # 200
            pool.free(a)
            c = pool.alloc((3000,), torch.int8, "c")  # 3000
            assert (pool.in_use, pool.peak) == (3200, 4200)
            d = pool.alloc((500,), torch.float32, "d")  # 2000
            assert (pool.in_use, pool.peak) == (5200, 5200)
            for t in (b, c, d):
                pool.free(t)
            assert (pool.in_use, pool.peak) == (0, 5200)
            pool.reset_peak()
            pool.alloc((7,), torch.int8, "e")
            assert pool.peak == 7
            with pytest.raises(ValueError, match="did not allocate|does not hold"):
                pool.free(a)  # freed already


def test_reserve_and_release():
    pool = Pool(Tier.GPU, 1000, "cpu")
    plan = pool.reserve(600, "decode plan")
    assert (pool.in_use, pool.peak) == (600, 600)
    with pytest.raises(BudgetError, match="^gpu: layer 0 weights needs 500 B but only 400 B of the"):
        pool.alloc((500,), torch.int8, "layer 0 weights")
    with pytest.raises(BudgetError, match="second plan"):
        pool.reserve(401, "second plan")
    pool.release(plan)
    assert pool.in_use == 0
    with pytest.raises(ValueError, match="not held"):
        pool.release(plan)
    twin = pool.reserve(600, "decode plan")  # same size and label, still a distinct reservation
    assert twin != plan and pool.in_use == 600


def test_budgets_from_gib_and_validation(tmp_path: Path):
    b = TierBudgets.from_gib(gpu_gib=1.5, cpu_gib=None, disk_gib=0, offload_dir=str(tmp_path))
    assert (b.gpu_bytes, b.cpu_bytes, b.disk_bytes) == (3 * GIB // 2, None, 0)
    assert b.budget(Tier.GPU) == 3 * GIB // 2 and b.budget(Tier.CPU) is None
    with pytest.raises(ValueError, match="gpu_bytes"):
        TierBudgets(gpu_bytes=-1, offload_dir=str(tmp_path))
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * GIB) == "3.0 GiB"


def test_units_convert_gib_and_bytes_both_ways():
    from runner.units import bytes_to_gib, format_gib, gib_to_bytes
    assert GIB == 2 ** 30 and gib_to_bytes(1.5) == 1610612736 and bytes_to_gib(3 * 2 ** 29) == 1.5
    assert bytes_to_gib(gib_to_bytes(79.65)) == 79.65
    assert format_gib(3 * 2 ** 29) == "1.50 GiB" and format_gib(2 ** 30 // 10, 1) == "0.1 GiB"
    assert gib_to_bytes(16e9 / GIB) == pytest.approx(16e9)  # a GB figure converted to GiB holds the same bytes


# ---------------------------------------------------------------- copy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("home", "there"), [(Tier.GPU, Tier.CPU), (Tier.CPU, Tier.DISK), (Tier.GPU, Tier.DISK)])
def test_round_trips_are_bit_exact_and_counted(memory: Memory, home: Tier, there: Tier, dtype: torch.dtype):
    data = _random((64, 33), dtype)
    src = _fill(memory, home, data)
    mid = memory.pool(there).alloc(data.shape, dtype, "mid")
    back = memory.pool(home).alloc(data.shape, dtype, "back")
    copy(mid, None, src, None, memory)
    copy(back, None, mid, None, memory)
    assert torch.equal(_bits(_read(memory, back)), _bits(data))
    n = data.numel() * dtype.itemsize
    expected = {(Tier.GPU, Tier.CPU): {"cpu<-gpu": n, "gpu<-cpu": n},
                (Tier.CPU, Tier.DISK): {"disk_write": n, "disk_read": n},
                # GPU <-> disk is staged through host memory: it counts on both links.
                (Tier.GPU, Tier.DISK): {"cpu<-gpu": n, "disk_write": n, "disk_read": n, "gpu<-cpu": n}}[home, there]
    assert memory.moved() == {k: expected.get(k, 0) for k in ("gpu<-cpu", "cpu<-gpu", "disk_read", "disk_write")}


def test_buffers_in_different_tiers_are_separate(memory: Memory):
    gpu = _fill(memory, Tier.GPU, torch.arange(8, dtype=torch.float32))
    cpu = memory.cpu.alloc((8,), torch.float32, "host copy")
    copy(cpu, None, gpu, None, memory)
    gpu.zero_()  # a real copy: the host buffer keeps its values
    assert cpu.tolist() == list(range(8))
    assert memory.tier_of(gpu) == Tier.GPU and memory.tier_of(cpu[2:5]) == Tier.CPU  # views too
    # Compute outputs no pool allocated live on the compute device: the GPU tier.
    assert memory.tier_of(gpu * 2) == Tier.GPU


@pytest.mark.parametrize("src_tier", [Tier.CPU, Tier.DISK])
def test_index_gather_into_dim0_prefix(memory: Memory, src_tier: Tier):
    data = _random((40, 4, 8), torch.float16, seed=1)
    src = _fill(memory, src_tier, data)
    dst = memory.gpu.alloc((32, 4, 8), torch.float16, "packed")
    rows = torch.tensor([39, 0, 7, 7, 12, 3])  # unordered, repeated
    moved = copy(dst, (slice(0, 6),), src, (rows,), memory)
    assert torch.equal(_bits(dst[:6]), _bits(data[rows]))
    n = 6 * 4 * 8 * 2  # the gathered bytes, not the source's
    via_disk = src_tier == Tier.DISK
    assert {d.value: b for d, b in moved.items()} == ({"disk_read": n, "gpu<-cpu": n} if via_disk else {"gpu<-cpu": n})
    assert memory.moved() == {"gpu<-cpu": n, "cpu<-gpu": 0, "disk_read": n if via_disk else 0, "disk_write": 0}


@pytest.mark.parametrize("dst_tier", [Tier.CPU, Tier.DISK])
def test_index_scatter_and_ranges(memory: Memory, dst_tier: Tier):
    dst = _fill(memory, dst_tier, torch.zeros(10, 3, dtype=torch.int8))
    src = _fill(memory, Tier.GPU, torch.arange(1, 13, dtype=torch.int8).view(4, 3))
    copy(dst, (torch.tensor([9, 2, 5]),), src, (slice(0, 3),), memory)  # scatter rows 0..2
    copy(dst, (slice(6, 7),), src, (slice(3, 4),), memory)  # a range into a range
    got = _read(memory, dst)
    assert got[[9, 2, 5]].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]] and got[6].tolist() == [10, 11, 12]
    assert int(got.abs().sum(1).ne(0).sum()) == 4  # nothing else written
    assert memory.moved()["cpu<-gpu"] == 12
    assert memory.moved()["disk_write"] == (12 if dst_tier == Tier.DISK else 0)


def test_non_tensor_advanced_indices_scatter_too(memory: Memory):
    """Lists and masks select copies under Python indexing: copy must still write into dst."""
    dst = _fill(memory, Tier.CPU, torch.zeros(6, dtype=torch.int8))
    src = _fill(memory, Tier.GPU, torch.tensor([5, 6], dtype=torch.int8))
    copy(dst, ([4, 1],), src, None, memory)
    copy(dst, torch.tensor([True, False, False, False, False, True]), src, slice(0, 2), memory)  # bare indices
    assert dst.tolist() == [5, 6, 0, 0, 5, 6] and memory.moved()["cpu<-gpu"] == 4


def test_copy_rejects_dtype_and_shape_mismatch_without_counting(memory: Memory):
    a = memory.gpu.alloc((4,), torch.float32, "a")
    with pytest.raises(TypeError, match="dtype mismatch"):
        copy(memory.cpu.alloc((4,), torch.float16, "b"), None, a, None, memory)
    with pytest.raises(ValueError, match="shape mismatch"):  # would broadcast silently otherwise
        copy(memory.cpu.alloc((2, 4), torch.float32, "c"), None, a, None, memory)
    assert set(memory.moved().values()) == {0}


def test_copy_within_a_tier_counts_nothing(memory: Memory):
    a = _fill(memory, Tier.CPU, torch.arange(6.0))
    b = memory.cpu.alloc((3,), torch.float32, "b")
    assert copy(b, None, a, (slice(3, 6),), memory) == {}
    assert b.tolist() == [3.0, 4.0, 5.0] and set(memory.moved().values()) == {0}


def test_disk_read_write_rows(tmp_path: Path):
    with DiskPool(str(tmp_path)) as disk:
        dt = disk.alloc((5, 2), torch.float32, "kv")
        assert os.path.getsize(dt.path) == dt.nbytes == 40
        disk.write(dt, torch.zeros(5, 2))
        disk.write(dt, torch.ones(2, 2), rows=slice(1, 3))
        disk.write(dt, torch.full((1, 2), 7.0), rows=torch.tensor([4]))
        assert disk.read(dt).tolist() == [[0, 0], [1, 1], [1, 1], [0, 0], [7, 7]]
        assert disk.read(dt, torch.tensor([4, 1])).tolist() == [[7, 7], [1, 1]]
        disk.free(dt)
        assert not os.path.exists(dt.path) and disk.in_use == 0
        with pytest.raises(ValueError, match="not held"):
            disk.read(dt)


# ---------------------------------------------------------------- disk without page cache

def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (longest matching mount point)."""
    p, best = str(path.resolve()), ("", "")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if (p == mount or p.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
            best = (mount, fstype)
    return best[1]


def _cached_share(disk: DiskPool, dt: DiskTensor) -> float:
    """Share of the file's pages in the OS page cache (mincore over the pool's map of the file)."""
    page = mmap.PAGESIZE
    pages = -(-dt.nbytes // page)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(disk.view(dt).data_ptr()), ctypes.c_size_t(dt.nbytes), vec) == 0
    return sum(v & 1 for v in vec) / pages


@pytest.fixture
def device_dir(tmp_path: Path) -> Path:
    if sys.platform != "linux":
        pytest.skip("page-cache eviction is Linux only")
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("tmp_path is on a RAM filesystem: its files live in the page cache")
    return tmp_path


def test_disk_pool_without_page_cache_keeps_files_out_of_it(device_dir: Path):
    data = _random((256, 1024), torch.float32, seed=3)  # 1 MiB
    with DiskPool(str(device_dir)) as warm, DiskPool(str(device_dir), page_cache=False) as cold:
        a, b = warm.alloc(data.shape, data.dtype, "a"), cold.alloc(data.shape, data.dtype, "b")
        warm.write(a, data)
        cold.write(b, data)
        assert _cached_share(warm, a) == 1.0  # the measure sees cached pages: a default pool keeps them
        assert _cached_share(cold, b) <= 0.05
        assert torch.equal(_bits(cold.read(b)), _bits(data))  # written to the device before eviction
        assert _cached_share(cold, b) <= 0.05  # a read leaves the file out of the cache again
        rows = cold.read(b, slice(10, 20))
        assert torch.equal(_bits(rows), _bits(data[10:20])) and _cached_share(cold, b) <= 0.05
        warm.drop_cache(a)  # explicit eviction works on any pool
        assert _cached_share(warm, a) <= 0.05 and torch.equal(_bits(warm.read(a)), _bits(data))


def test_copies_through_a_memory_without_page_cache_are_exact_and_evicted(device_dir: Path):
    data = _random((128, 512), torch.float16, seed=4)
    with Memory(TierBudgets(offload_dir=str(device_dir), disk_page_cache=False), device="cpu") as mem:
        disk = mem.disk.alloc(data.shape, data.dtype, "home")
        gpu = _fill(mem, Tier.GPU, data, "src")
        copy(disk, None, gpu, None, mem)
        assert _cached_share(mem.disk, disk) <= 0.05
        back = mem.gpu.alloc(data.shape, data.dtype, "back")
        copy(back, None, disk, None, mem)
        assert torch.equal(_bits(back), _bits(data)) and _cached_share(mem.disk, disk) <= 0.05
        assert mem.moved()["disk_read"] == mem.moved()["disk_write"] == data.numel() * 2


# ---------------------------------------------------------------- disk cleanup
