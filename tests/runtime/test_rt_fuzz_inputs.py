"""Issue 19's fuzz targets, for what issue 11's suite (test_rt_fuzz.py) missed:

7. allocation-driving sizes: image arrays of any shape and dtype (zero-copy broadcasts, so a 100000 x 100000
   request costs nothing to make, only to mishandle), outpaint margins of any size, masks, Flash's options;
   each outcome is a result or a typed error, and the process's peak memory grows by less than 500 MB;
8. numpy and bytes inputs to the Python API's task methods (images, masks, seeds, numbers);
9. artifact directories holding foreign files and folders: taking the write lock (stale-writer cleanup) and
   the export's garbage collection never delete or change them.

Same profiles as test_rt_fuzz.py: `fast` in the default run, `long` under `-m slow`.
"""
from __future__ import annotations

import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
from fuzz_helpers import FAST, LONG, ReachedWork, only_typed_errors, snapshot
from hypothesis import event, given
from hypothesis import strategies as st

PEAK_GROWTH_BYTES = 500 * 2**20


@pytest.fixture(scope="module")
def stub_pipeline(tiny_artifacts):
    """The real pipeline on the tiny artifacts whose backend stops at the first model call."""
    from k3trt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(tiny_artifacts)

    def stop(component, feeds):
        raise ReachedWork(component)

    pipe.backend._run = stop
    return pipe


# ------------------------------------------------------------------------------------------- 7 + 8. inputs
SIDES = st.one_of(st.integers(0, 130), st.sampled_from([64, 128, 192, 2048, 2049, 12800, 100_000, 2**31]))
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.float64, np.bool_, np.complex64, object])
VALUES = st.sampled_from([0, 1, 0.5, 255, 65535, -1, 1e9, float("nan"), float("inf")])


@st.composite
def arrays(draw, channels=(3, 1, 4, None)):
    """A zero-copy broadcast of one value to a drawn shape and dtype (huge shapes cost no memory to make)."""
    shape = (draw(SIDES), draw(SIDES)) + ((draw(st.sampled_from(channels)),) if draw(st.booleans()) else ())
    shape = tuple(s for s in shape if s is not None)
    dtype, value = draw(DTYPES), draw(VALUES)
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            scalar = np.array(value).astype(dtype)
    except (OverflowError, ValueError, TypeError):
        scalar = np.array(0).astype(dtype)
    return np.broadcast_to(scalar, shape)


PICTURES = st.one_of(arrays(), st.binary(max_size=16), st.none(), st.integers(), st.just("missing.png"),
                     st.builds(lambda a: np.ascontiguousarray(a), arrays(channels=(3,)).filter(
                         lambda a: a.size <= 192 * 192 * 3)))
MARGINS = st.one_of(
    st.lists(st.tuples(st.sampled_from(["left", "right", "top", "bottom", "up"]),
                       st.one_of(st.integers(-64, 4096), st.sampled_from([2_000_000, 10**9, "9" * 5000]))),
             max_size=3).map(lambda items: ",".join(f"{k}={v}" for k, v in items)),
    st.dictionaries(st.sampled_from(["left", "top", 3]), st.one_of(st.integers(-1, 10**6), st.text(max_size=3)),
                    max_size=2),
    st.integers(), st.none())
NUMBERS = st.one_of(st.integers(-1, 2**65), st.sampled_from([np.int64(3), np.uint64(2**63), np.float32(0.5),
                                                             np.int8(-1), np.bool_(True), 2**32]))


@st.composite
def task_calls(draw):
    task = draw(st.sampled_from(["img2img", "inpaint", "outpaint", "flash"]))
    options = draw(st.fixed_dictionaries({}, optional={"seed": NUMBERS, "steps": NUMBERS, "num_images": NUMBERS}))
    if task == "flash":
        options.update(draw(st.fixed_dictionaries({}, optional={
            "guidance": st.one_of(st.none(), st.floats(allow_nan=True, allow_subnormal=False)),
            "negative_prompt": st.one_of(st.none(), st.text(max_size=4)), "height": SIDES, "width": SIDES})))
        return task, (), options
    image = draw(PICTURES)
    if task == "img2img":
        options["strength"] = draw(st.one_of(st.floats(0, 1, allow_subnormal=False), NUMBERS))
        return task, (image,), options
    if task == "inpaint":
        return task, (image, draw(st.one_of(arrays(channels=(1, 3)), PICTURES))), options
    return task, (image,), {**options, "outpaint": draw(MARGINS)}


def task_input_property(pipe, call) -> None:
    task, args, options = call
    method = {"img2img": pipe.img2img, "inpaint": pipe.inpaint, "outpaint": pipe.inpaint, "flash": pipe.flash}[task]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = only_typed_errors(lambda: method("a fox", *args, **options))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < PEAK_GROWTH_BYTES, (task, [getattr(a, "shape", type(a)) for a in args], options, grown)
    event(f"{task}: {outcome}")


@FAST
@given(task_calls())
def test_fuzz_task_inputs(stub_pipeline, call):
    task_input_property(stub_pipeline, call)


@pytest.mark.slow
@LONG
@given(task_calls())
def test_fuzz_task_inputs_long(stub_pipeline, call):
    task_input_property(stub_pipeline, call)


# ------------------------------------------------------------------------------------------- 9. foreign files
NAMES = st.one_of(
    st.text(alphabet="abcxyz-_.0123456789", min_size=1, max_size=12).filter(lambda n: n not in (".", "..")),
    st.sampled_from([".staging-unet-1-x", ".staging-movq_decoder-abc", ".refit-1", ".calib-2", "fp32-000000000000",
                     "int8-0123456789ab", "tokenizer-000000000000.json", "scheduler_config-abc.json", "my-backup",
                     "model.onnx", ".k3trt-output.json.bak", ".manifest.json.tmp", "notes.tmp"]))
WHERE = st.sampled_from(["", "unet", "tokenizer", "scheduler", "movq_decoder", "text_encoder", "engines"])


def _foreign(name: str) -> bool:
    """Whether a name is one the project's own records claim: mkstemp's `.NAME.XXXXXXXX.tmp` is k3trt's atomic
    write in progress (runtime/locking.py: STALE_FILES); such names are not generated as a user's."""
    from k3trt.writing.locking import STALE_FILES

    return not STALE_FILES.match(name) and name != ".k3trt-output.json"


@st.composite
def foreign_entries(draw):
    entries = draw(st.lists(st.tuples(WHERE, NAMES.filter(_foreign), st.booleans()), min_size=1, max_size=4,
                            unique_by=lambda e: (e[0], e[1])))
    return [(where, name, is_dir) for where, name, is_dir in entries]


def foreign_files_property(art: Path, entries) -> None:
    from k3trt.export.writer import collect_garbage
    from k3trt.contract.manifest import Manifest
    from k3trt.writing.locking import artifact_lock

    made = []
    for where, name, is_dir in entries:
        path = art / where / name
        if path.exists() or (art / where).is_file():
            continue  # a name the artifacts already use: not a foreign file
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            path.mkdir()
            (path / "mine.txt").write_text("user data")
        else:
            path.write_text("user data")
        made.append(path)
    before = snapshot(art)
    try:
        with artifact_lock(art, lambda _line: None):
            manifest = Manifest.load(art)
            collect_garbage(manifest, manifest.referenced_paths())
        after = snapshot(art)
        for path in made:
            for key in [k for k in before if Path(art / k) == path or path in Path(art / k).parents]:
                assert after.get(key) == before[key], (key, entries)
    finally:
        for path in made:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def gc_art(tiny_artifacts, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("fuzz-gc") / "art"
    shutil.copytree(tiny_artifacts, dest)
    return dest


@FAST
@given(foreign_entries())
def test_fuzz_foreign_files_survive_garbage_collection(gc_art, entries):
    foreign_files_property(gc_art, entries)


@pytest.mark.slow
@LONG
@given(foreign_entries())
def test_fuzz_foreign_files_survive_garbage_collection_long(gc_art, entries):
    foreign_files_property(gc_art, entries)
