"""The GPU check script and benchmark, without a GPU: the dry run lists the steps, validates the
wheels folder and collects the gpu tests; the benchmark runs at a tiny size on the CPU."""

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _dry_run(tmp_path: Path, wheels: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels)]
        + list(args),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


def _wheel(folder: Path, name: str, version: str) -> None:
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(
            f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n"
        )


def _aot_archive(folder: Path, version: str, modules: list[str]) -> Path:
    """A prebuilt-kernel archive as scripts/build_flashinfer_aot.sh writes it."""
    stage = folder.parent / f"stage-{version}"
    for name in modules:
        (stage / name).mkdir(parents=True)
        (stage / name / f"{name}.so").write_bytes(b"\x7fELF")
    (stage / "MANIFEST").write_text(f"flashinfer-python {version}\n")
    archive = folder / f"flashinfer-aot-{version}-sm90a.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(stage, arcname=".")
    return archive


def test_dry_run_lists_steps_plans_wheels_and_collects_gpu_tests(tmp_path):
    """Also: no step's time limit reaches past ``--budget`` (a device call ends there, and
    whatever ran past it is lost): each is cut to what is left, less the kill grace."""
    wheels = tmp_path / "whl"
    _wheel(wheels, "lark", "0.0.1")  # another version than installed: would be installed
    _wheel(wheels, "pytest", __import__("pytest").__version__)  # already here: left alone
    _wheel(wheels, "flashinfer_python", "0.6.18.post1")
    archive = _aot_archive(wheels, "0.6.18.post1", ["batch_prefill_a", "cascade"])
    result = _dry_run(tmp_path, wheels, "--budget", "150")
    assert result.returncode == 0, result.stdout + result.stderr
    limits = [int(x) for x in re.findall(r"timeout (\d+)s", result.stdout)]
    assert len(limits) == 6, result.stdout  # wheels, jit, two test runs, two benchmarks
    assert all(10 <= limit <= 150 - 15 for limit in limits), limits
    bench = re.search(r"gpu_decode.py --time-budget (\d+)", result.stdout)
    assert bench and int(bench.group(1)) + 30 <= 150
    out = result.stdout
    for step in (
        "step 1/5 wheels",
        "step 2/5 env",
        "step 3/5 jit",
        "step 4/5 tests",
        "step 5/5 bench",
    ):
        assert step in out
    assert "install  lark==0.0.1" in out and "present  pytest==" in out
    assert "pip install" in out and "lark-0.0.1-py3-none-any.whl" in out
    assert "pytest" in out and "-m gpu" in out and "benchmarks/gpu_decode.py" in out
    # The gpu tests of CUDA graphs and overlap (never run on a GPU yet; test_backends.py's last)
    # run after all others: a sticky CUDA error in one would fail every test after it.
    gpu_run = next(line for line in out.splitlines() if "-m gpu" in line and "would run" in line)
    assert gpu_run.rstrip().endswith("tests/test_backends.py"), gpu_run
    assert f"would unpack {archive.name} into flashinfer/data/aot: 2 modules" in out
    assert f"archive  {archive.name}" in out, "counted with the wheels"
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "test_gpu_backends_reproduce_the_dense_forward" in summary, "gpu tests collected"
    assert "test_gpu_backends_follow_nested_forks_and_joins" in summary
    assert "test_gpu_kernels_at_model_shapes" in summary
    assert "done: status 0" in summary


def test_dry_run_without_prebuilt_kernels_of_the_flashinfer_version_leaves_them_to_jit(tmp_path):
    wheels = tmp_path / "whl"
    _wheel(wheels, "flashinfer_python", "0.6.18.post1")
    _aot_archive(wheels, "0.6.1", ["stale"])  # another version's kernels
    result = _dry_run(tmp_path, wheels, "--skip", "tests,bench")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no prebuilt kernels (flashinfer-aot-0.6.18.post1-sm90a.tar.xz)" in result.stdout
    assert "tests: skipped" in result.stdout and "collected" not in result.stdout


def test_dry_run_skips_either_test_run(tmp_path):
    """--skip gpu-tests or cuda-tests leaves out one of the two test runs; the run on CUDA tensors
    leaves out the slow tests (a compile check that needs no GPU, an interpreter-sized one). A
    result file a stopped benchmark was rewriting is not left behind."""
    torn = tmp_path / "out" / ".gpu_decode.json.partial"
    torn.parent.mkdir()
    torn.write_text('{"part"')
    result = _dry_run(tmp_path, tmp_path / "no-wheels", "--skip", "gpu-tests,jit,bench")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not torn.exists()
    runs = [
        line for line in result.stdout.splitlines() if "would run" in line and "-m pytest" in line
    ]
    assert "gpu tests: skipped" in result.stdout and "collected" not in result.stdout
    assert len(runs) == 1 and "-m not gpu and not slow" in runs[0].replace("'", ""), runs
    result = _dry_run(tmp_path, tmp_path / "no-wheels", "--skip", "cuda-tests,jit,bench")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [
        line for line in result.stdout.splitlines() if "would run" in line and "-m pytest" in line
    ]
    assert "tests on CUDA tensors: skipped" in result.stdout
    assert len(runs) == 1 and "-m gpu" in runs[0], runs


def test_dry_run_skips_the_steps_the_budget_leaves_no_room(tmp_path):
    """A step that does not fit in ``--budget`` is skipped and says so (the time limits of
    those that fit: test_dry_run_lists_steps_plans_wheels_and_collects_gpu_tests)."""
    result = _dry_run(tmp_path, tmp_path / "no-wheels", "--budget", "20", "--skip", "tests")
    assert "jit: skipped, the budget is spent" in result.stdout
    assert "bench: skipped, the budget is spent" in result.stdout
    assert "done: status 1" in result.stdout


def test_dry_run_rejects_two_versions_of_one_package(tmp_path):
    wheels = tmp_path / "whl"
    _wheel(wheels, "lark", "1.0.0")
    _wheel(wheels, "lark", "1.1.0")
    result = _dry_run(tmp_path, wheels)
    assert result.returncode != 0
    assert "two versions of lark" in result.stdout


def _gpu_decode():
    """The benchmark script as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_decode
    finally:
        sys.path.pop(0)
    return gpu_decode


def _attention_inputs(gpu_decode, prefix: int, tail: int):
    """The benchmark's attention case for 2 prompts x 3 samples at the quick model's shape:
    ``(model, slot views, lanes, query, k_cache, v_cache)``."""
    model = gpu_decode.build_model(
        gpu_decode.QUICK, "cpu", torch.float32, gpu_decode.byte_tokenizer()
    )
    views, lanes, shape = gpu_decode.attention_case(model, 2, 3, prefix, tail)
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    query = torch.randn(len(lanes), model.config.num_attention_heads, model.config.head_dim)
    return model, views, lanes, query, k_cache, v_cache


def test_benchmark_runs_at_a_tiny_size(tmp_path):
    gpu_decode = _gpu_decode()
    code = gpu_decode.main(
        ["--quick", "--device", "cpu", "--parts", "attention,selection,widths,profile,generate",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "gpu_decode.json").read_text())
    rows = {(r["part"], r.get("width")): r for r in report["results"]}
    assert rows[("attention", None)]["ms"] > 0
    assert rows[("widths", 1)]["generated_tokens"] == 12, "sequential: exactly the step tokens"
    assert rows[("widths", 2)]["widths"] == [2] and rows[("widths", 2)]["speedup_vs_width1"] > 0
    split = (
        rows[("widths", 2)]["forward_ms_per_decode_step"]
        + rows[("widths", 2)]["pick_ms_per_decode_step"]
    )
    assert (
        0
        < split
        <= rows[("widths", 2)]["ms_per_step"] * (1 + 1 / rows[("widths", 2)]["decode_steps"])
    )
    profiled = [r for r in report["results"] if r["part"] == "profile"]
    assert [r["width"] for r in profiled] == [1, 4]
    assert profiled[0]["generated_tokens"] == 6 and profiled[1]["host_ms_per_step"] > 0
    generated = [r for r in report["results"] if r["part"] == "generate"]
    assert [r["batch"] for r in generated] == [1, 2] and generated[1]["tokens_per_s"] > 0
    selection = [r for r in report["results"] if r["part"] == "selection"]
    assert [(r["rows"], r["backend"]) for r in selection] == [
        (rows, way) for rows in (8, 64) for _ in range(2) for way in ("exact", "speculating")
    ]
    assert all(r["ms_per_call"] > 0 for r in selection)
    speculated = [r["settled"] for r in selection if r["backend"] == "speculating" and "top_p" in r["sampling"]]  # fmt: skip
    assert speculated == [1.0, 1.0], "peaked rows: each nucleus ends among the candidates"
    assert sum(r["settled"] is None for r in selection) == 6
    assert "flashinfer" in report["info"]["backends_missing"]
    assert (tmp_path / "gpu_decode.md").read_text().startswith("| part |")


def test_benchmark_part_that_raises_leaves_the_others_and_the_files(tmp_path, monkeypatch):
    """A part (or one backend's run) that raises on the GPU is recorded with its error; the
    parts after it still run, the result files are written, and the exit status says so."""
    gpu_decode = _gpu_decode()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(gpu_decode, "bench_attention", broken)
    monkeypatch.setattr(gpu_decode, "profile_steps", broken)
    code = gpu_decode.main(["--quick", "--device", "cpu", "--backends", "torch", "--widths", "1",
                            "--parts", "attention,widths,profile,generate", "--out", str(tmp_path)])  # fmt: skip
    assert code == 1
    report = json.loads((tmp_path / "gpu_decode.json").read_text())
    failed = {(r["part"], r["backend"]) for r in report["results"] if "error" in r}
    assert failed == {("attention", "-"), ("profile", "torch")}
    ran = {r["part"] for r in report["results"] if "tokens_per_s" in r}
    assert ran == {"widths", "generate"}
    table = (tmp_path / "gpu_decode.md").read_text()
    assert "| attention | - |  | failed (see the JSON) |" in table
    assert not list(tmp_path.glob(".*partial")), "files are replaced whole"


class _HardTimeLimit(BaseException):
    """What ``timeout``'s kill is to the benchmark: nothing after it runs."""


@pytest.mark.parametrize(
    ("part", "killed_call", "killed_case"),
    [("widths", 2, 2), ("profile", 3, 4), ("generate", 3, 2), ("rl_group", 1, None)],
)
def test_benchmark_run_killed_midway_is_on_record(tmp_path, monkeypatch, part, killed_call, killed_case):  # fmt: skip
    """gpu_check.sh kills the benchmark at a hard limit past its budget: the run it was in
    stays in the result files, marked as running, after the runs that finished."""
    import transformers

    gpu_decode = _gpu_decode()
    calls = []

    def killed_at(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == killed_call:
                raise _HardTimeLimit
            return real(*args, **kwargs)

        return call

    if part == "generate":
        generate = killed_at(transformers.GenerationMixin.generate)
        monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    else:
        monkeypatch.setattr(gpu_decode, "run_engine", killed_at(gpu_decode.run_engine))
    with pytest.raises(_HardTimeLimit):
        gpu_decode.main(["--quick", "--device", "cpu", "--backends", "torch", "--parts", part,
                         "--out", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "gpu_decode.json").read_text())["results"]
    assert [r["part"] for r in results] == [part] * (1 if killed_case is None else 2)
    assert all("skipped" not in r for r in results[:-1])
    assert results[-1]["skipped"] == gpu_decode.RUNNING
    assert results[-1].get("width", results[-1].get("batch")) == killed_case
    assert "running when the hard time limit came" in (tmp_path / "gpu_decode.md").read_text()


@pytest.mark.skipif(
    not (ROOT / ".whl").is_dir(), reason="no .whl folder (scripts/fetch_gpu_wheels.sh)"
)
def test_fetched_wheels_fit_one_device_call():
    carried = list((ROOT / ".whl").glob("*.whl")) + list((ROOT / ".whl").glob("*.tar.xz"))
    assert sum(f.stat().st_size for f in carried) < 60 * 2**20


def test_benchmark_page_tables_of_whole_pages_attend_like_one_slot_pages():
    """The benchmark's page-size comparison converts the engine's one-slot page tables to whole
    pages; attention over either table must be the same."""
    gpu_decode = _gpu_decode()
    from kernels.attention import cascade_decode_attention
    from npr_graph.engine.backends import TritonBackend

    model, views, lanes, query, k_cache, v_cache = _attention_inputs(gpu_decode, 64, 37)
    for cascade in (True, False):
        levels = TritonBackend(cascade=cascade, kernels="torch").levels(lanes, views)
        assert len(levels) == (2 if cascade else 1)
        paged = gpu_decode._whole_pages(levels, 16)
        assert paged is not None and paged[0].kv_indices.numel() * 16 >= levels[0].max_kv_len
        want = cascade_decode_attention(query, k_cache, v_cache, levels, backend="torch")
        pages = [t.view(-1, 16, *t.shape[1:]) for t in (k_cache, v_cache)]
        got = cascade_decode_attention(query, *pages, paged, backend="torch")
        torch.testing.assert_close(got, want)
    # a group starting mid-page cannot be a table of whole pages
    odd = levels[0]
    odd = type(odd)(odd.qo_indptr, odd.kv_indptr, odd.kv_indices + 1, odd.kv_last_page_len,
                    odd.max_kv_len, odd.max_group_size)  # fmt: skip
    assert gpu_decode._whole_pages([odd], 16) is None


def test_triton_backend_with_other_tiles_attends_like_the_torch_reference(monkeypatch):
    """The attention part's sweep of Triton tiles runs the backend with ``tiles`` (under the
    interpreter here): the plan takes them, and the attention stays the same."""
    from kernels import attention_triton
    from kernels.attention import cascade_decode_attention
    from npr_graph.engine.backends import TritonBackend

    launches = []
    plan_launch = attention_triton.plan_launch

    def recording(*args, **kwargs):
        launches.append(plan_launch(*args, **kwargs))
        return launches[-1]

    monkeypatch.setattr(attention_triton, "plan_launch", recording)
    model, views, lanes, query, k_cache, v_cache = _attention_inputs(_gpu_decode(), 40, 9)
    backend = TritonBackend(cascade=True, tiles=(32, 32, 2, 2))
    backend.attach(model, torch.device("cpu"))
    levels = backend.levels(lanes, views)
    want = cascade_decode_attention(query, k_cache, v_cache, levels, backend="torch")
    got = backend.plan_decode(lanes, views)(query, k_cache, v_cache, backend.scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tiles = [(la.block_q, la.block_t, la.warps, la.stages) for la in launches]
    assert tiles == [(32, 32, 2, 2)]


def test_nested_attention_case_reads_each_path_once():
    """The attention part's nested case: with levels for nested branches, the branches of a
    path read the path once between them; the Triton kernels (interpreted) attend like SDPA
    over each lane's whole view, with those levels and without."""
    from kernels.attention import paged_decode_reference
    from npr_graph.engine.backends import TritonBackend, flat_level

    gpu_decode = _gpu_decode()
    model = gpu_decode.build_model(
        gpu_decode.QUICK, "cpu", torch.float32, gpu_decode.byte_tokenizer()
    )
    paths, branches, path_tokens = 2, 3, 32  # a path of whole pages: its branches share it all
    views, lanes, shape = gpu_decode.nested_attention_case(
        model, paths, branches, 32, path_tokens, 8
    )
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    query = torch.randn(len(lanes), model.config.num_attention_heads, model.config.head_dim)
    want = paged_decode_reference(query, k_cache, v_cache, flat_level(views))[0]
    read = {}
    for nested in (True, False):
        backend = TritonBackend(nested=nested)
        backend.attach(model, torch.device("cpu"))
        levels = backend.levels(lanes, views)
        read[nested] = (len(levels), sum(int(level.kv_indptr[-1]) for level in levels))
        got = backend.plan_decode(lanes, views)(query, k_cache, v_cache, backend.scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert read[True][0] == read[False][0] + 1
    assert read[False][1] - read[True][1] == paths * (branches - 1) * path_tokens
