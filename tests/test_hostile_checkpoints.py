"""Hostile checkpoints: a checkpoint is a file from anyone.

What these tests promise:

* Loading a checkpoint never runs code: a pickle inside one (an object
  array, or raw pickle bytes where an array should be) is refused by name,
  and its payload, which would create a marker folder, never runs.
* Loading never allocates more than the architecture in the file's metadata
  implies, and that architecture must fit in the file: a .npy header or a
  metadata entry asking for a terabyte is refused with tracemalloc's peak
  under a small multiple of the file's size.
* Every array whose shape or dtype disagrees with that architecture, and
  every extra, missing, duplicated or compressed member, is refused, by
  member name, before any array data is read; nonsense in the metadata
  (negative, zero, huge, NaN or mistyped sizes; unknown layers, optimizers,
  losses, schedules; forged RNG states) too.
* Whatever the damage, ``nn.load`` and the ``--resume`` path (read,
  ``model_from``, ``Trainer.restore``) either load a model whose arrays match
  its architecture or raise CheckpointError naming the file, nothing else:
  Hypothesis mutates real checkpoints (byte flips, truncation, inserted
  bytes, members replaced, metadata numbers changed, keys removed, types
  swapped) to check it, derandomized so CI sees the same examples each run.
* The command line turns all of this into one ``nnaccel CMD: error: ...``
  line and exit status 2.
"""

import io
import json
import math
import os
import pickle
import re
import tempfile
import tracemalloc
import zipfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format

import nnaccel as nn
from nnaccel import checkpoint, cli
from command_line import nnaccel

ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAN, INF = float("nan"), float("inf")
KINDS = ("mlp-adam", "mlp-sgd-momentum-float64", "conv-batchnorm-adam", "conv-batchnorm-model-only")


def _peak_limit(size):
    """What a load may allocate: a few copies of the file (arrays, model, gradients, optimizer state)
    plus the fixed cost of the Python objects."""
    return 8 * size + 2**20


@lru_cache(maxsize=None)
def _real(kind):
    """The bytes of a small real checkpoint, saved by ``Trainer.save_checkpoint`` (the SGD one with early
    stopping's best weights) or ``model.save``."""
    if kind.startswith("mlp"):
        model = nn.Sequential(nn.Dense(6, 5, activation="relu"), nn.Dropout(0.2), nn.Dense(5, 3), seed=1,
                              dtype=numpy.float64 if "float64" in kind else numpy.float32)
        optimizer = nn.SGD(lr=0.1, momentum=0.9) if "sgd" in kind else nn.Adam()
    else:
        model = nn.Sequential(nn.Conv2D(1, 2, 3, activation="relu"), nn.BatchNorm(2), nn.MaxPool2D(2),
                              nn.Flatten(), nn.Dense(18, 3), input_shape=(1, 8, 8), seed=2)
        optimizer = nn.Adam()
    trainer = nn.Trainer(model, optimizer=optimizer, batch_size=4, quiet=True)
    x = numpy.random.default_rng(0).random((12, model.in_features)).astype(model.dtype)
    trainer.fit(x, numpy.arange(12) % 3, epochs=1, callbacks=[nn.EarlyStopping("loss")] if "sgd" in kind else [])
    if "idle-velocity" in kind:
        optimizer.momentum = 0.0  # the velocity is kept, unused, for when the momentum is on again
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ck.npz"
        model.save(path) if kind.endswith("model-only") else trainer.save_checkpoint(path)
        return path.read_bytes()


def _members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _zip(members, compressed=()):
    """A zip of ``members`` (a dict, or ``(name, bytes)`` pairs to allow duplicates), stored unless named in
    ``compressed``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, blob in (members.items() if isinstance(members, dict) else members):
            archive.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), blob,
                             compress_type=zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED)
    return buffer.getvalue()


def _npy(array):
    buffer = io.BytesIO()
    npy_format.write_array(buffer, numpy.asanyarray(array), allow_pickle=True)
    return buffer.getvalue()


def _forged_npy(shape, descr="<f4", data=b""):
    """A .npy header claiming ``shape`` of ``descr``, followed by ``data`` (usually far less)."""
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _meta(data):
    return json.loads(str(npy_format.read_array(io.BytesIO(_members(data)["meta.npy"]))))


def _with_meta(data, meta):
    members = _members(data)
    members["meta.npy"] = _npy(numpy.array(json.dumps(meta)))
    return _zip(members)


def _array(data, name):
    return npy_format.read_array(io.BytesIO(_members(data)[name]))


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ----- the two ways in, watched by tracemalloc ------------------------------------------------------
def _matches_architecture(model, meta, arrays):
    """The loaded model holds the file's arrays, in the shapes and dtype its architecture implies (those of
    a model built afresh from it)."""
    fresh = nn.Sequential.from_config(meta["model"])
    assert [(p.name, p.shape) for p in model.parameters()] == [(p.name, p.shape) for p in fresh.parameters()]
    assert [(name, b.shape) for name, b in model.buffers()] == [(name, b.shape) for name, b in fresh.buffers()]
    assert model.dtype == fresh.dtype
    for p in model.parameters():
        numpy.testing.assert_array_equal(p.data, arrays[f"param/{p.name}"])
    for name, b in model.buffers():
        numpy.testing.assert_array_equal(b, arrays[f"buffer/{name}"])
    for key, value in arrays.items():
        assert value.dtype == model.dtype, key
        if key.startswith("optim/") or key.endswith("/params"):
            assert value.shape == (model.num_parameters(),), key


def _load(path):
    model = nn.load(path)
    _matches_architecture(model, *checkpoint.read(path))
    return model


def _resume(path):
    """``nnaccel train --resume``'s way in: read, model_from, Trainer(...) and Trainer.restore."""
    trainer = cli._trainer_from_checkpoint(SimpleNamespace(resume=str(path), quiet=True, cuda_graphs=True, precision="fp32"), "cpu")
    _matches_architecture(trainer.model, *checkpoint.read(path))
    for buffer in trainer.optimizer.state.values():
        assert buffer.shape == trainer.model.flat_params.shape
    return trainer


def _outcome(way, path, size):
    """``(way(path), None)``, or ``(None, the CheckpointError)``, which must name the file; any other
    exception escapes, and an allocation peak over ``_peak_limit(size)`` fails."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            result, error = way(path), None
        except nn.CheckpointError as refusal:
            assert path.name in str(refusal), refusal
            result, error = None, refusal
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
    assert peak <= _peak_limit(size), f"{way.__name__} of a {size:,}-byte file allocated {peak:,} bytes"
    return result, error


def _load_or_refuse(data, folder):
    """``(loaded model or None, resumed trainer or None)`` for ``data``: each either works or is a
    CheckpointError, in bounded memory."""
    path = Path(folder) / "bad.npz"
    path.write_bytes(data)
    return _outcome(_load, path, len(data))[0], _outcome(_resume, path, len(data))[0]


def _refusal(data, tmp_path, name="bad.npz"):
    """The message of the CheckpointError that every way in raises for ``data`` (the same from each)."""
    path = tmp_path / name
    path.write_bytes(data)
    messages = []
    for way in (checkpoint.read, _load, _resume):
        result, error = _outcome(way, path, len(data))
        assert error is not None, f"{way.__name__} accepted it"
        messages.append(str(error))
    assert path.name in messages[0]
    if "cannot be resumed" not in messages[2]:
        assert len(set(messages)) == 1, messages
    return messages[0]


def test_the_real_checkpoints_load_and_resume(tmp_path):
    for kind in KINDS:
        model, trainer = _load_or_refuse(_real(kind), tmp_path)
        assert model is not None
        assert (trainer is None) == kind.endswith("model-only")


@pytest.mark.parametrize("kind", ["conv-batchnorm-adam", "conv-batchnorm-model-only"])
def test_a_checkpoint_from_before_batchnorm_took_an_activation_loads_and_resumes(tmp_path, kind):
    """Its BatchNorm's config has no activation keys: the layer it builds (linear) is the one saved."""
    meta = _meta(_real(kind))
    batchnorm = meta["model"]["layers"][1]
    assert batchnorm.pop("activation") == "linear" and batchnorm.pop("activation_params") == {}
    model, trainer = _load_or_refuse(_with_meta(_real(kind), meta), tmp_path)
    assert repr(model.layers[1]) == "BatchNorm(2)" and (trainer is None) == kind.endswith("model-only")


# ----- 1. pickles ----------------------------------------------------------------------------------
PICKLE_PLACES = [("param/0.weight.npy", "object array", r"member 'param/0\.weight' holds Python objects"),
                 ("optim/m.npy", "object array", r"member 'optim/m' holds Python objects"),
                 ("buffer/1.running_mean.npy", "object array", r"member 'buffer/1\.running_mean' holds Python objects"),
                 ("meta.npy", "object array", r"corrupt 'meta' entry"),
                 ("param/4.bias.npy", "raw pickle", r"member 'param/4\.bias' is not a \.npy array"),
                 ("extra.npy", "object array", r"no place for: extra\.npy")]


@pytest.mark.parametrize("member, form, message", PICKLE_PLACES, ids=[f"{m} {f}" for m, f, _ in PICKLE_PLACES])
def test_a_pickle_is_refused_and_never_runs(tmp_path, member, form, message):
    marker = tmp_path / "the pickle ran"
    blob = _npy(numpy.array([_Payload(marker)], dtype=object)) if form == "object array" else \
        pickle.dumps(_Payload(marker))
    numpy.load(io.BytesIO(blob), allow_pickle=True) if form == "object array" else pickle.loads(blob)
    assert marker.is_dir(), "the payload must work for this test to mean anything"
    marker.rmdir()
    members = _members(_real("conv-batchnorm-adam"))
    members[member] = blob
    assert re.search(message, _refusal(_zip(members), tmp_path))
    assert not marker.exists(), "loading a checkpoint ran its pickle"


# ----- 2. allocation bounded by the file -----------------------------------------------------------
@pytest.mark.parametrize("claim", [(10**12,), (2**27,), (2**20, 2**20)], ids=["4 TB", "512 MiB", "4 TiB 2-D"])
def test_a_header_claiming_a_huge_array_is_refused_in_bounded_memory(tmp_path, claim):
    data = _real("mlp-adam")
    members = _members(data)
    members["param/0.weight.npy"] = _forged_npy(claim, data=_array(data, "param/0.weight.npy").tobytes())
    message = _refusal(_zip(members), tmp_path)
    assert re.search(rf"member 'param/0\.weight' has shape {re.escape(str(claim))} but the architecture in its "
                     rf"metadata implies \(6, 5\)", message), message


@pytest.mark.parametrize("width", [10**6, 2**12], ids=["10^12 parameters", "16M parameters"])
def test_an_architecture_bigger_than_its_file_is_refused_before_allocating(tmp_path, width):
    data = _real("mlp-adam")
    meta = _meta(data)
    meta["model"]["input_shape"] = [width]
    meta["model"]["layers"][0]["in_features"] = meta["model"]["layers"][0]["out_features"] = width
    meta["model"]["layers"][2]["in_features"] = width
    message = _refusal(_with_meta(data, meta), tmp_path)
    count = width * width + width + width * 3 + 3
    assert f"describes a network of {count:,} parameters" in message and "refused before allocating" in message


# ----- 3. shapes, dtypes and members ---------------------------------------------------------------
def _member_cases():
    for kind in ("conv-batchnorm-adam", "mlp-sgd-momentum-float64"):
        for name in sorted(_members(_real(kind))):
            if name != "meta.npy":
                yield pytest.param(kind, name, id=f"{kind} {name[:-4]}")


@pytest.mark.parametrize("kind, member", list(_member_cases()))
def test_a_member_of_another_shape_or_dtype_is_refused_by_name(tmp_path, kind, member):
    data = _real(kind)
    good = _array(data, member)
    key = re.escape(member[:-4])
    dtype = good.dtype
    other = numpy.float32 if dtype == numpy.float64 else numpy.float64
    for array, message in [(numpy.zeros(good.shape + (1,), dtype), rf"member '{key}' has shape "
                            rf"{re.escape(str(good.shape + (1,)))} but the architecture in its metadata implies "
                            rf"{re.escape(str(good.shape))}"),
                           (good.astype(other), rf"member '{key}' has dtype {numpy.dtype(other).str} but the model "
                            rf"computes in {dtype}"),
                           (good.astype(numpy.int32), rf"member '{key}' has dtype <i4"),
                           (good.astype(dtype.newbyteorder(">")), rf"member '{key}' has dtype >f")]:
        members = _members(data)
        members[member] = _npy(array)
        found = _refusal(_zip(members), tmp_path)
        assert re.search(message, found), (message, found)


def test_an_idle_sgd_velocity_of_another_shape_is_refused_by_name(tmp_path):
    """SGD at momentum 0 keeps the velocity of its earlier steps with momentum; that member is checked as a
    used one is (a wrong one would otherwise load, and break the first step with momentum again)."""
    data = _real("mlp-sgd-idle-velocity")
    members = _members(data)
    good = _array(data, "optim/velocity.npy")
    members["optim/velocity.npy"] = _npy(good[:-1])
    found = _refusal(_zip(members), tmp_path)
    assert re.search(rf"member 'optim/velocity' has shape \({good.size - 1},\) but the architecture in its metadata "
                     rf"implies \({good.size},\)", found), found


def test_a_fortran_order_member_loads_its_values(tmp_path):
    data = _real("conv-batchnorm-adam")
    members = _members(data)
    weight = _array(data, "param/4.weight.npy")
    members["param/4.weight.npy"] = _npy(numpy.asfortranarray(weight))
    assert npy_format.read_array_header_1_0(io.BytesIO(members["param/4.weight.npy"][8:]))[1]
    model, trainer = _load_or_refuse(_zip(members), tmp_path)
    numpy.testing.assert_array_equal(model.parameters()[4].data, weight)
    numpy.testing.assert_array_equal(trainer.model.parameters()[4].data, weight)


MEMBER_DAMAGE = [
    ("extra array", lambda m: m.update({"param/9.weight.npy": _npy(numpy.zeros(3, numpy.float32))}),
     r"holds 1 member\(s\) its architecture has no place for: param/9\.weight\.npy"),
    ("extra file", lambda m: m.update({"notes.txt": b"hello"}), r"no place for: notes\.txt"),
    ("missing buffer", lambda m: m.pop("buffer/1.running_var.npy"),
     r"lacks 1 array\(s\) its architecture needs: buffer/1\.running_var"),
    ("missing parameter", lambda m: m.pop("param/0.bias.npy"), r"lacks 1 array\(s\) .*: param/0\.bias"),
    ("one optimizer buffer of two", lambda m: m.pop("optim/v.npy"), r"lacks 1 array\(s\) .*: optim/v"),
    ("optimizer buffer of another optimizer", lambda m: m.update({"optim/velocity.npy": m["optim/m.npy"]}),
     r"no place for: optim/velocity\.npy"),
    ("no meta", lambda m: m.pop("meta.npy"), r"is not an nnaccel checkpoint \(no 'meta' entry\)"),
    ("array data with bytes after it", lambda m: m.update({"param/4.bias.npy": m["param/4.bias.npy"] + bytes(8)}),
     r"member 'param/4\.bias' is \d+ bytes but its header implies \d+"),
    ("array data cut short", lambda m: m.update({"param/4.bias.npy": m["param/4.bias.npy"][:-4]}),
     r"member 'param/4\.bias' is \d+ bytes but its header implies \d+"),
    ("a NaN weight", lambda m: _change(m, "param/0.weight.npy", lambda a: a.flat.__setitem__(3, numpy.nan)),
     r"member 'param/0\.weight' holds NaN or inf, from which nothing can be computed \(a damaged or edited file"),
    ("a NaN running mean", lambda m: _change(m, "buffer/1.running_mean.npy", lambda a: a.fill(numpy.nan)),
     r"member 'buffer/1\.running_mean' holds NaN, from"),
    ("a negative running variance", lambda m: _change(m, "buffer/1.running_var.npy", lambda a: a.fill(-1.0)),
     r"member 'buffer/1\.running_var' holds a negative variance \(-1\)"),
    ("a NaN Adam moment", lambda m: _change(m, "optim/m.npy", lambda a: a.flat.__setitem__(0, numpy.nan)),
     r"member 'optim/m' holds NaN, from"),
]


def _change(members, name, edit):
    """``members`` with the array of ``name`` changed in place by ``edit``."""
    array = numpy.load(io.BytesIO(members[name])).copy()
    edit(array)
    members[name] = _npy(array)


@pytest.mark.parametrize("case, damage, message", MEMBER_DAMAGE, ids=[case for case, _, _ in MEMBER_DAMAGE])
def test_extra_missing_and_inconsistent_members_are_refused(tmp_path, case, damage, message):
    members = _members(_real("conv-batchnorm-adam"))
    damage(members)
    found = _refusal(_zip(members), tmp_path)
    assert re.search(message, found), found


@pytest.mark.parametrize("member", ["early_stopping/0/params", "last/params"])
def test_an_inf_in_weights_a_fit_puts_back_is_refused(tmp_path, member):
    """Early stopping's best weights and the last epoch's are weights too: a fit puts them in the model, whose
    every output an inf would make NaN; refused by member, as an inf among the model's own weights is."""
    data = _real("mlp-sgd-momentum-float64")
    members, meta = _members(data), _meta(data)
    meta["trainer"]["last_weights"] = True  # (the file's run ended on its best epoch: it kept no last weights)
    members["meta.npy"] = _npy(numpy.array(json.dumps(meta)))
    for part in ("params", "buffers"):
        members[f"last/{part}.npy"] = members[f"early_stopping/0/{part}.npy"]
    assert _load_or_refuse(_zip(members), tmp_path)[1] is not None  # the file as edited, inf aside, resumes
    _change(members, f"{member}.npy", lambda a: a.flat.__setitem__(2, INF))
    found = _refusal(_zip(members), tmp_path)
    assert f"member {member!r} holds NaN or inf, from which nothing can be computed" in found, found


@pytest.mark.parametrize("member", ["param/0.weight", "early_stopping/0/params"])
def test_float64_weights_beyond_float32_are_refused_by_a_float32_trainer(tmp_path, member):
    """A float64 checkpoint resumes in a float32 model, its arrays rounded; a weight of 1e39 would round to inf
    (every output NaN, after an overflow warning): refused by member, the trainer left as it was. The same
    file loads as the float64 model it is."""
    data = _real("mlp-sgd-momentum-float64")
    members = _members(data)
    _change(members, f"{member}.npy", lambda a: a.flat.__setitem__(1, -1e39))
    path = tmp_path / "big.npz"
    path.write_bytes(_zip(members))
    assert nn.load(path).dtype == numpy.float64
    trainer = nn.Trainer(nn.Sequential.from_config({**_meta(data)["model"], "dtype": "float32"}),
                         optimizer=nn.SGD(lr=0.1, momentum=0.9), quiet=True)
    weights = trainer.model.flat_params.copy()
    with pytest.raises(nn.CheckpointError, match=f"member {re.escape(repr(member))} holds -?1e\\+39, beyond the "
                                                 f"range of float32, the model's dtype, where it would be inf"):
        trainer.load_checkpoint(path)
    numpy.testing.assert_array_equal(trainer.model.flat_params, weights)
    assert trainer.epoch == 0 and not trainer.optimizer.state


def test_an_overflowed_adam_second_moment_loads_and_resumes(tmp_path):
    """Adam's v overflows to inf for a gradient beyond 1.8e19 in float32, and training goes on (that weight's
    update is 0): a checkpoint of that state is not damage."""
    members = _members(_real("conv-batchnorm-adam"))
    _change(members, "optim/v.npy", lambda a: a.flat.__setitem__(0, numpy.inf))
    _, trainer = _load_or_refuse(_zip(members), tmp_path)
    assert trainer is not None and numpy.isinf(trainer.optimizer.state_dict()["buffers"]["v"].flat[0])


def test_a_batchnorm_variance_that_training_overflowed_saves_and_loads(tmp_path):
    """Inputs near 1e19 overflow BatchNorm's running variance to inf in float32; the model still evaluates
    (those features normalise to 0), and its checkpoint loads and evaluates the same."""
    x = numpy.random.default_rng(0).uniform(0, 3e19, (64, 4)).astype(numpy.float32)
    y = numpy.arange(64) % 2
    trainer = nn.Trainer(nn.Sequential(nn.BatchNorm(4), nn.Dense(4, 2), input_shape=(4,)), batch_size=16, quiet=True)
    trainer.fit(x, y, epochs=2)
    assert numpy.isinf(trainer.model.flat_buffers).any()
    trainer.save_checkpoint(tmp_path / "bn.npz")
    loaded = nn.load(tmp_path / "bn.npz")
    assert nn.Trainer(loaded, quiet=True).evaluate(x, y) == trainer.evaluate(x, y)


def test_a_duplicated_member_is_refused(tmp_path):
    members = list(_members(_real("conv-batchnorm-adam")).items())
    members.append(("param/0.bias.npy", _npy(numpy.full(2, 7.0, numpy.float32))))
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = _zip(members)
    assert "two members named param/0.bias.npy" in _refusal(data, tmp_path)


# ----- 4. compression and zip bombs ----------------------------------------------------------------
def test_a_compressed_member_is_refused(tmp_path):
    data = _real("conv-batchnorm-adam")
    message = _refusal(_zip(_members(data), compressed={"param/0.weight.npy"}), tmp_path)
    assert re.search(r"member 'param/0\.weight' is compressed \(zip method 8\).*zip bomb", message), message


@pytest.mark.parametrize("name", ["optim/m.npy", "bomb.npy"])
def test_a_zip_bomb_is_refused_before_it_expands(tmp_path, name):
    """64 MiB of zeros deflated to about 64 KiB, in place of a member or beside the others."""
    members = _members(_real("conv-batchnorm-adam"))
    members.pop(name, None)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, blob in members.items():
            archive.writestr(member, blob)
        info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as stream:
            stream.write(_forged_npy((2**24,)))
            zeros = bytes(2**20)
            for _ in range(64):
                stream.write(zeros)
    data = buffer.getvalue()
    assert len(data) < 2**20
    message = _refusal(data, tmp_path)
    assert name in message or name[:-4] in message, message


# ----- 5. nonsense in the metadata -----------------------------------------------------------------
def _set(*keys_and_value):
    """A change to the metadata: ``_set("model", "layers", 0, "in_channels", -1)``; value ``...`` deletes."""
    *keys, value = keys_and_value

    def change(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        if value is ...:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return change


CONV = ("model", "layers", 0)
STOPPING = {"monitor": "loss", "sign": 1.0, "since": 0, "weights_epoch": None}
DENSE = ("model", "layers", 4)
NONSENSE_META = [
    ("conv in_channels -1", _set(*CONV, "in_channels", -1), "in_channels must be a positive integer"),
    ("conv out_channels 0", _set(*CONV, "out_channels", 0), "out_channels must be a positive integer"),
    ("conv out_channels 10^12", _set(*CONV, "out_channels", 10**12), "over the limit of 2,147,483,647"),
    ("conv kernel 1.5", _set(*CONV, "kernel_size", [1.5, 3]), "kernel_size must be a positive integer"),
    ("conv kernel NaN", _set(*CONV, "kernel_size", [NAN, 3]), "kernel_size is nan, not a finite number"),
    ("conv stride '2'", _set(*CONV, "stride", ["2", 2]), "stride must be a positive integer"),
    ("conv kernel bigger than the image", _set(*CONV, "kernel_size", [9, 9]), "does not fit"),
    ("conv unknown option", _set(*CONV, "eval", "__import__('os')"), "unexpected keyword argument 'eval'"),
    ("dense in_features true", _set(*DENSE, "in_features", True), "in_features must be a positive integer"),
    ("dense out_features null", _set(*DENSE, "out_features", None), "out_features must be a positive integer"),
    ("dense in_features a list", _set(*DENSE, "in_features", [18]), "in_features must be a positive integer"),
    ("dense inputs that do not chain", _set(*DENSE, "in_features", 17), "layer sizes do not chain"),
    ("dense init zeros", _set(*DENSE, "init", "zeros"), "unknown init 'zeros'"),
    ("dense activation unknown", _set(*DENSE, "activation", "nope"), "unknown activation 'nope'"),
    ("leaky_relu slope inf", lambda m: m["model"]["layers"][4].update(activation="leaky_relu",
                                                                      activation_params={"slope": INF}),
     "slope is inf, not a finite number"),
    ("activation params a list", _set(*DENSE, "activation_params", [1]), "unreadable architecture: TypeError"),
    ("batchnorm momentum 2", _set("model", "layers", 1, "momentum", 2.0), "momentum must be in"),
    ("batchnorm features 10^12", _set("model", "layers", 1, "num_features", 10**12), "over the limit"),
    ("pool padding more than half the kernel", _set("model", "layers", 2, "padding", [2, 2]), "at most half"),
    ("unknown layer type", _set("model", "layers", 3, {"type": "Lambda", "code": "os.system('x')"}),
     "unknown layer type 'Lambda'"),
    ("layer a string", _set("model", "layers", 3, "Flatten"), "layer 3 is 'Flatten', not a layer's config"),
    ("no layers", _set("model", "layers", []), "0 layers"),
    ("layers a dict", _set("model", "layers", {"0": "Dense"}), "needs a list of 'layers'"),
    ("no model", _set("model", ...), "needs a list of 'layers'"),
    ("dtype object", _set("model", "dtype", "object"), "dtype 'object', not float32 or float64"),
    ("dtype float16", _set("model", "dtype", "float16"), "not float32 or float64"),
    ("model seed -1", _set("model", "seed", -1), "the model's seed must be an integer"),
    ("input shape negative", _set("model", "input_shape", [-1, 8, 8]), "input_shape must be a positive integer"),
    ("input shape huge", _set("model", "input_shape", [1, 2**40, 8]), "the input shape is 1099511627776"),
    ("input of 2^31 values", lambda m: (m["model"].update(input_shape=[1, 2**15, 2**16]),
                                         m["model"]["layers"][4].update(in_features=2 * 16383 * 32767)),
     "its input holds 2,147,483,648 values per sample, over the limit of 2,147,483,647"),
    ("format", _set("format", "pickle"), "is not an nnaccel checkpoint"),
    ("version 2", _set("version", 2), "is checkpoint version 2; this nnaccel reads 1"),
    ("dropout counters a string", _set("dropout_counters", "x"), "'dropout_counters' must be a list"),
    ("dropout counter -1", _set("dropout_counters", 0, -1), "a dropout counter must be an integer"),
    ("optimizer unknown", _set("optimizer", "config", "type", "evil"), "unknown optimizer 'evil'"),
    ("optimizer lr a string", _set("optimizer", "config", "lr", "x"), "learning rate must be a finite number"),
    ("optimizer unknown option", _set("optimizer", "config", "amsgrad", True),
     "optimizer 'adam' takes no option 'amsgrad'"),
    ("optimizer betas (2, 0.9)", _set("optimizer", "config", "betas", [2, 0.9]), "betas must be two numbers"),
    ("optimizer config a list", _set("optimizer", "config", [1]), "unreadable optimizer state"),
    ("optimizer steps -1", _set("optimizer", "steps", -1), "step count must be an integer"),
    ("optimizer steps 1.5", _set("optimizer", "steps", 1.5), "step count must be an integer"),
    ("optimizer lr NaN", _set("optimizer", "lr", NAN), "learning rate must be a finite number >= 0, found nan"),
    ("trainer a number", _set("trainer", 5), "unreadable trainer state: 5"),
    ("trainer epoch -1", _set("trainer", "epoch", -1), "the trainer's epoch must be an integer"),
    ("trainer no epoch", _set("trainer", "epoch", ...), "its trainer state has no 'epoch'"),
    ("trainer seed a string", _set("trainer", "seed", "x"), "the trainer's seed must be an integer"),
    ("trainer batch size 0", _set("trainer", "batch_size", 0), "batch size must be an integer from 1"),
    ("trainer world size 0", _set("trainer", "world_size", 0), "world size must be an integer from 1"),
    ("trainer loss unknown", _set("trainer", "loss", "nope"), "unreadable loss: unknown loss 'nope'"),
    ("trainer loss a number", _set("trainer", "loss", 5), "unreadable loss"),
    ("trainer rng of another generator", _set("trainer", "rng", "bit_generator", "MT19937"), "not a PCG64"),
    ("trainer rng state a string", _set("trainer", "rng", "state", "state", "x"), "not a PCG64"),
    ("trainer rng a list", _set("trainer", "rng", [1, 2]), "not a PCG64"),
    ("trainer history a string", _set("trainer", "history", "x"), "history must map names to lists of numbers"),
    ("trainer history of strings", _set("trainer", "history", "loss", ["x"]), "history must map names"),
    ("trainer resume point 0", _set("trainer", "resume_point", 0), "resume point must hold"),
    ("trainer resume step -1", _set("trainer", "resume_point", {"step": -1, "rng": {}, "loss_sum": 0.0,
                                                               "correct_sum": 0.0}), "resume point's step"),
    ("trainer resume batch a string", _set("trainer", "resume_point", {"step": 1, "rng": {}, "loss_sum": 0.0,
                                                                      "correct_sum": 0.0, "batch_size": "x"}),
     "resume point's samples per step must be the run's batch size"),
    ("trainer resume rng forged", _set("trainer", "resume_point", {"step": 1, "rng": {"a": 1}, "loss_sum": 0.0,
                                                                  "correct_sum": 0.0}), "resume point's random"),
    ("schedule step size 0", _set("trainer", "schedule", {"type": "StepLR", "step_size": 0}),
     "unreadable schedule: StepLR step_size must be a positive integer"),
    ("schedule unknown", _set("trainer", "schedule", {"type": "Chaos"}), "unknown schedule 'Chaos'"),
    ("schedule a string", _set("trainer", "schedule", "StepLR"), "unreadable schedule"),
    ("plan a string", _set("trainer", "plan", "x"), "the run's plan must hold its epochs, a validation split"),
    ("plan split 1", _set("trainer", "plan", {"epochs": 3, "validation_split": 1}), "the run's plan must hold"),
    ("plan split NaN", _set("trainer", "plan", {"epochs": 3, "validation_split": NAN}), "the run's plan must hold"),
    ("plan data a number", _set("trainer", "plan", {"epochs": 3, "validation_split": 0.2, "data": 5}),
     "and the data's name or path"),
    ("plan data empty", _set("trainer", "plan", {"epochs": 3, "validation_split": 0.2, "data": ""}),
     "and the data's name or path"),
    ("plan data a long path", _set("trainer", "plan", {"epochs": 3, "validation_split": 0.2, "data": "a" * 5000}),
     "and the data's name or path"),
    ("plan epochs 0", _set("trainer", "plan", {"epochs": 0, "validation_split": 0.2}),
     "the run's planned epochs must be an integer from 1"),
    ("early stopping a string", _set("trainer", "early_stopping", "x"), "early stopping states must be a list"),
    ("early stopping sign 0", _set("trainer", "early_stopping", [dict(STOPPING, sign=0)]), "a sign of 1 or -1"),
    ("early stopping sign true", _set("trainer", "early_stopping", [dict(STOPPING, sign=True)]), "a sign of 1 or -1"),
    ("early stopping unknown key", _set("trainer", "early_stopping", [dict(STOPPING, code="x")]), "must hold a monitor"),
    ("early stopping after the epoch", _set("trainer", "early_stopping", [dict(STOPPING, since=2)]),
     "early stopping began after epoch 2, later than the trainer's epoch 1"),
    ("early stopping weights epoch 0", _set("trainer", "early_stopping", [dict(STOPPING, weights_epoch=0)]),
     "the epoch of early stopping's best weights must be an integer from 1"),
    ("early stopping weights not there", _set("trainer", "early_stopping", [dict(STOPPING, weights_epoch=1)]),
     "lacks 2 array(s) its architecture needs: early_stopping/0/params, early_stopping/0/buffers"),
    ("last weights 1", _set("trainer", "last_weights", 1), "last epoch's weights must be true or false, found 1"),
    ("last weights not there", _set("trainer", "last_weights", True),
     "lacks 2 array(s) its architecture needs: last/params, last/buffers"),
]


@pytest.mark.parametrize("case, change, message", NONSENSE_META, ids=[case for case, _, _ in NONSENSE_META])
def test_nonsense_metadata_is_refused_by_every_way_in(tmp_path, case, change, message):
    data = _real("conv-batchnorm-adam")
    meta = _meta(data)
    change(meta)
    found = _refusal(_with_meta(data, meta), tmp_path)
    assert message in found, found


def test_a_meta_entry_over_its_limit_is_refused_unread(tmp_path):
    data = _real("mlp-adam")
    meta = _meta(data)
    limit = 8 * 2**20  # checkpoint.META_LIMIT
    meta["padding"] = "x" * (limit // 4)
    message = _refusal(_with_meta(data, meta), tmp_path)
    assert re.search(rf"its 'meta' entry is [\d,]+ bytes, over the limit of {limit:,}", message), message
    assert checkpoint.META_LIMIT == limit


# ----- 6. fuzzing real checkpoints -----------------------------------------------------------------
def _check_mutant(data, what):
    with tempfile.TemporaryDirectory() as folder:
        model, trainer = _load_or_refuse(data, folder)
    event(f"{what}: {'loaded' if model is not None else 'CheckpointError'}")


@settings(FUZZ, max_examples=70)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fuzz_bytes_of_real_checkpoints(kind, data):
    good = _real(kind)
    bad = bytearray(good)
    how = data.draw(st.sampled_from(["flip", "truncate", "insert"]), label="how")
    if how == "flip":
        # Half the flips go to the zip's central directory and end record, where its structure lives.
        directory = good.rindex(b"PK\x01\x02")
        where = st.one_of(st.integers(0, len(good) - 1), st.integers(directory - 600, len(good) - 1))
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            position = data.draw(where, label="position")
            bad[position] ^= data.draw(st.integers(1, 255), label="xor")
    elif how == "truncate":
        bad = bad[:data.draw(st.integers(0, len(good) - 1), label="length")]
    else:
        position = data.draw(st.integers(0, len(good)), label="position")
        bad[position:position] = data.draw(st.binary(min_size=1, max_size=64), label="inserted")
    _check_mutant(bytes(bad), how)


def _replacement(draw, members, name):
    """Bytes to put in place of member ``name``: another member, another array, a pickle, garbage."""
    good = npy_format.read_array(io.BytesIO(members[name])) if name.endswith(".npy") else numpy.zeros(1)
    choice = draw(st.sampled_from(["other member", "array", "pickle", "garbage", "header cut", "forged header"]),
                  label="replacement")
    if choice == "other member":
        return choice, members[draw(st.sampled_from(sorted(members)), label="other")]
    if choice == "array":
        shape = draw(st.sampled_from([good.shape, good.shape + (1,), (good.size,), (), (1,), (0,), good.shape[::-1]]),
                     label="shape")
        dtype = draw(st.sampled_from(["<f4", "<f8", ">f4", "<f2", "<i4", "|u1", "|b1", "<c8", "<U3"]), label="dtype")
        array = numpy.zeros(shape, dtype)
        return choice, _npy(numpy.asfortranarray(array) if draw(st.booleans(), label="fortran") else array)
    if choice == "pickle":
        return choice, _npy(numpy.array([_Payload("/nonexistent/never")], dtype=object))
    if choice == "garbage":
        return choice, draw(st.binary(max_size=200), label="garbage")
    if choice == "header cut":
        return choice, members[name][:draw(st.integers(0, 127), label="cut")]
    return choice, _forged_npy(draw(st.sampled_from([(10**12,), (2**40, 2**40), (-1,), (2**63 - 1,), good.shape])),
                               draw(st.sampled_from(["<f4", "<f8", "|O", "V8"])), members[name][128:])


@settings(FUZZ, max_examples=60)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fuzz_members_of_real_checkpoints(kind, data):
    members = _members(_real(kind))
    name = data.draw(st.sampled_from(sorted(members)), label="member")
    what = data.draw(st.sampled_from(["replace", "remove", "rename", "compress"]), label="what")
    compressed = ()
    if what == "replace":
        what, members[name] = _replacement(data.draw, members, name)
    elif what == "remove":
        members.pop(name)
    elif what == "rename":
        members[data.draw(st.sampled_from(["param/0.weight", "x.npy", "optim/m.npy", name.upper(), ""]),
                          label="new name")] = members.pop(name)
    else:
        compressed = {name}
    _check_mutant(_zip(members, compressed), what)


def _paths(node, path=()):
    """Every place in a JSON tree, as the keys that lead there."""
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, path + (key,))


ODD_VALUES = [-1, 0, 1, 2, 3, 0.5, -0.0, 2**31, 2**63, 10**12, -10**12, NAN, INF, -INF, 1e308, "", "x", "relu",
              "float64", None, True, False, [], {}, [1, 2], [[]], {"type": "Dense"}, {"a": 1}]


@settings(FUZZ, max_examples=70)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fuzz_metadata_of_real_checkpoints(kind, data):
    good = _real(kind)
    meta = _meta(good)
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        places = [p for p in _paths(meta) if p]
        path = data.draw(st.sampled_from(places), label="where")
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        value = parent[path[-1]]
        how = data.draw(st.sampled_from(["remove", "replace", "number"]), label="how")
        if how == "remove":
            del parent[path[-1]]
        elif how == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[path[-1]] = data.draw(st.sampled_from([value + 1, value - 1, value * 2, -value, value / 2,
                                                          float(value), int(value) if math.isfinite(value) else 0]),
                                         label="number")
        else:
            parent[path[-1]] = data.draw(st.sampled_from(ODD_VALUES), label="value")
    _check_mutant(_with_meta(good, meta), "meta")


# ----- 7. the command line ------------------------------------------------------------------------
def _terabyte_architecture():
    data = _real("mlp-adam")
    meta = _meta(data)
    meta["model"]["input_shape"] = [10**6]
    meta["model"]["layers"][0].update(in_features=10**6, out_features=10**6)
    meta["model"]["layers"][2]["in_features"] = 10**6
    return _with_meta(data, meta)


def _forged_rng_state():
    data = _real("mlp-adam")
    meta = _meta(data)
    meta["trainer"]["rng"]["state"] = "x"
    return _with_meta(data, meta)


CLI_FILES = {"terabyte architecture": _terabyte_architecture, "forged RNG state": _forged_rng_state}


@pytest.mark.parametrize("command, bad", [(["evaluate", "BAD.npz", "--data", "digits"], "terabyte architecture"),
                                          (["train", "--resume", "BAD.npz", "--data", "digits", "--quiet"],
                                           "forged RNG state")], ids=["evaluate", "train --resume"])
def test_the_command_line_refuses_a_hostile_checkpoint_in_one_line(tmp_path, command, bad):
    (tmp_path / "BAD.npz").write_bytes(CLI_FILES[bad]())
    run = nnaccel(*command, cwd=tmp_path, env=ENV)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"nnaccel {command[0]}: error: BAD.npz") and run.stdout == "", run.stderr
