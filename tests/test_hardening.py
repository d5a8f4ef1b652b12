"""Hardening (issue 21): no silent wrong answers, one validation path.

The model's and the checkpoint's byte order, the checkpoint's metadata
schema, the validation shared by the SSM functions and the models'
parameters; then a property test per public function (dtypes with byte
order, shapes, strides, special values).  The byte order, integer-input,
causality and SSMFilter-state cases of one function are in that function's
file (test_selective_scan.py, test_ssm_filter.py).
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import numba_mamba as nm
from numba_mamba import models
from numba_mamba.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.scan_cases import float64_args as _scan_args
from tests.scan_cases import non_native as _swapped

def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ byte order
def test_model_forward_with_big_endian_inputs():
    cfg = models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=1, d_state=4)
    params = models.init_params(cfg, dtype=np.float64)
    x = _rng(3).standard_normal((1, 5, 2))
    want = models.model_forward(x, params, cfg)[0]
    got = models.model_forward(_swapped(x), params, cfg)[0]
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, want)
    swapped = dict(params, **{"norm_f.weight": _swapped(params["norm_f.weight"])})
    with pytest.raises(TypeError, match=r"params\['norm_f.weight'\] must be in native byte"):
        models.model_forward(x, swapped, cfg)


def test_checkpoint_of_the_other_byte_order_loads_native(tmp_path):
    path = tmp_path / "ck.npz"
    w = np.arange(4.0).astype(">f4")
    save_checkpoint(path, {"w": w})
    got = load_checkpoint(path).params["w"]
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, w)


# ------------------------------------------------------------------ checkpoints
def _meta(path):
    with np.load(path) as npz:
        return json.loads(npz["__meta__"].tobytes()), {k: npz[k] for k in npz.files
                                                        if k != "__meta__"}


def _rewrite(path, meta, arrays):
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _edit(meta, field, value):
    meta = json.loads(json.dumps(meta))
    *parents, last = field.split(".")
    target = meta
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return meta


@pytest.mark.parametrize("field,value,message", [
    ("optimizer", [1, 2], "field 'optimizer' must be an object"),
    ("optimizer", "adamw", "field 'optimizer' must be an object"),
    ("step", None, "field 'step' must be an integer >= 0, got None"),
    ("step", "7", "field 'step' must be an integer"),
    ("step", True, "field 'step' must be an integer"),
    ("step", KeyError, "__meta__ lacks the field\\(s\\) step"),
    ("extra", KeyError, "lacks the field\\(s\\) extra"),
    ("config", [1], "field 'config' must be an object"),
    ("config", {"d_model": 8}, "field 'config' is not a MambaConfig"),
    ("config", {"d_model": "8", "n_layers": 1, "vocab_size": 5}, "field 'config' is not"),
    ("optimizer.betas", 0.9, "field 'optimizer.betas' must be a list of two numbers"),
    ("optimizer.t", None, "field 'optimizer.t' must be an integer"),
    ("optimizer.lr", "1e-3", "field 'optimizer.lr' must be a number"),
    ("optimizer.eps", KeyError, "field 'optimizer' lacks 'eps'"),
    ("arrays", [], "field 'arrays' must be an object"),
    ("arrays.param/w", [[3], 7], "field 'arrays.param/w' must be \\[shape"),
    ("arrays.param/w", None, "field 'arrays.param/w' must be \\[shape"),
    ("version", "1", "has checkpoint format version '1'"),
])
def test_checkpoint_meta_schema_errors_name_file_and_field(tmp_path, field, value, message):
    cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=5, d_state=4)
    opt = nm.AdamW(lr=1e-3)
    params = {"w": np.arange(3.0)}
    opt.step(params, {"w": np.ones(3)})
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params, config=cfg, optimizer=opt, step=3, extra={"a": 1})
    meta, arrays = _meta(path)
    _rewrite(path, _edit(meta, field, value), arrays)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("step,error", [(True, TypeError), (2.5, TypeError), (-1, ValueError)])
def test_save_checkpoint_refuses_a_step_load_would_refuse(tmp_path, step, error):
    with pytest.raises(error, match="^step must be an integer"):
        save_checkpoint(tmp_path / "ck.npz", {"w": np.zeros(2)}, step=step)
    assert not (tmp_path / "ck.npz").exists()
    save_checkpoint(tmp_path / "ck.npz", {"w": np.zeros(2)}, step=np.int64(4))
    assert load_checkpoint(tmp_path / "ck.npz").step == 4


def test_checkpoint_meta_not_an_object(tmp_path):
    path = tmp_path / "ck.npz"
    _rewrite(path, ["numba-mamba-checkpoint", 1], {})
    with pytest.raises(CheckpointError, match="its __meta__ is a list, not a JSON object"):
        load_checkpoint(path)


# ------------------------------------------------------------------ one validation path
def _four(A, B=None, C=None, dt=0.5):
    """discretize, ssm_kernel, ssm_filter, SSMFilter on one A (as given: a
    list stays a list)."""
    shape = np.shape(A)
    B = np.ones(shape) if B is None else B
    C = np.ones(shape) if C is None else C
    x = np.ones(shape[:-1] + (5,))
    return {
        "discretize": lambda: nm.discretize(A, B, dt),
        "ssm_kernel": lambda: nm.ssm_kernel(A, B, C, dt, 5),
        "ssm_filter": lambda: nm.ssm_filter(A, B, C, x, dt=dt),
        "SSMFilter": lambda: nm.SSMFilter(A, B, C, dt=dt)(x),
    }


@pytest.mark.parametrize("name", ["discretize", "ssm_kernel", "ssm_filter", "SSMFilter"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_A_is_an_error_everywhere(name, value):
    A = -np.ones((2, 3))
    A[1, 2] = value
    with pytest.raises(ValueError, match="^A must be finite"):
        _four(A)[name]()


@pytest.mark.parametrize("name", ["discretize", "ssm_kernel", "ssm_filter", "SSMFilter"])
def test_unstable_A_warns_everywhere(name):
    with pytest.warns(nm.UnstableFilterWarning, match="positive real part"):
        _four(np.array([[0.5, -1.0]]))[name]()
    with pytest.warns(nm.UnstableFilterWarning, match="'euler' lie outside the unit circle"):
        if name == "discretize":
            nm.discretize(np.array([-30.0]), 1.0, 0.1, method="euler")
        elif name == "ssm_kernel":
            nm.ssm_kernel(np.array([-30.0]), 1.0, 1.0, 0.1, 4, method="euler")
        elif name == "ssm_filter":
            nm.ssm_filter(np.array([-30.0]), 1.0, 1.0, np.ones(4), dt=0.1, method="euler")
        else:
            nm.SSMFilter(np.array([-30.0]), 1.0, 1.0, dt=0.1, method="euler")


@pytest.mark.parametrize("name", ["discretize", "ssm_kernel", "ssm_filter", "SSMFilter"])
def test_no_states_is_an_error_everywhere(name):
    with pytest.raises(ValueError, match=r"^A must have (shape \(\.\.\., N\) with N >= 1|at "
                                         r"least one entry)"):
        _four(np.zeros((2, 0)))[name]()


@pytest.mark.parametrize("name", ["discretize", "ssm_kernel", "ssm_filter", "SSMFilter"])
@pytest.mark.parametrize("kind", [np.int64, np.int32])
def test_integer_arrays_are_taken_like_integer_lists(name, kind):
    """An integer ndarray was a TypeError where the same list was accepted."""
    A = [[-1, -2], [-3, -1]]
    B = [[1, 2], [0, 1]]
    from_list = _four(A, B, B, dt=1)[name]()
    from_array = _four(np.array(A, kind), np.array(B, np.uint8), np.array(B, kind),
                       dt=np.array(1, kind))[name]()
    for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (from_list, from_array))):
        assert a.dtype == b.dtype == np.float64
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call,message", [
    (lambda: nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones((2, 4)), axis=True), "^axis must be"),
    (lambda: nm.ssm_kernel(-np.ones(2), 1.0, 1.0, 0.1, True), "^L must be an integer"),
    (lambda: nm.ssm_kernel(-np.ones(2), 1.0, 1.0, 0.1, 4.0), "^L must be an integer"),
    (lambda: nm.discretize(-np.ones(2), 1.0, True), "^dt must be a number"),
    (lambda: nm.selective_scan(**_scan_args(_rng()), delta_softplus="no"),
     "^delta_softplus must be True or False, got 'no'"),
    (lambda: nm.selective_scan(**_scan_args(_rng()), delta_softplus=1),
     "^delta_softplus must be True or False"),
    (lambda: nm.selective_scan(**_scan_args(_rng()), return_last_state="yes"),
     "^return_last_state must be True or False"),
    (lambda: nm.selective_scan_vjp(**_scan_args(_rng()), delta_softplus=None),
     "^delta_softplus must be True or False"),
    (lambda: nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones(4), method=0), "^method must be"),
])
def test_bools_and_numbers_are_not_taken_for_each_other(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


# ------------------------------------------------------------------ models
def _model():
    cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=11, d_state=4)
    return cfg, models.init_params(cfg)


def test_params_of_another_config_are_refused():
    cfg, params = _model()
    for other, message in [
        (models.MambaConfig(d_model=8, n_layers=1, vocab_size=11, d_state=4),
         "params has 10 parameter\\(s\\) the config does not, first 'layers.1"),
        (models.MambaConfig(d_model=8, n_layers=3, vocab_size=11, d_state=4),
         "params lacks 10 parameter\\(s\\) of the config, first 'layers.2"),
        (models.MambaConfig(d_model=8, n_layers=2, vocab_size=11, d_state=8),
         r"params\['layers.0.mixer.x_proj.weight'\] must have shape \(17, 16\)"),
        (models.MambaConfig(d_model=8, n_layers=2, vocab_size=12, d_state=4),
         r"params\['embedding.weight'\] must have shape \(12, 8\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.model_forward(np.array([[1, 2]]), params, other)
        with pytest.raises(ValueError, match=message):
            models.loss_and_grads(np.array([[1, 2]]), np.array([[2, 3]]), params, other)


def test_a_missing_parameter_is_named():
    cfg, params = _model()
    del params["layers.1.mixer.A_log"]
    with pytest.raises(ValueError, match=r"params lacks 1 parameter\(s\) of the config, "
                                         r"first 'layers.1.mixer.A_log' \(shape \(16, 4\)\)"):
        models.model_forward(np.array([[1, 2]]), params, cfg)
    with pytest.raises(TypeError, match=r"params\['norm_f.weight'\] must be a floating array"):
        models.model_forward(np.array([[1, 2]]), dict(_model()[1], **{"norm_f.weight": [1] * 8}),
                             cfg)


def test_list_inputs_are_taken_as_arrays():
    cfg, params = _model()
    want = models.model_forward(np.array([[1, 2, 3]]), params, cfg)[0]
    np.testing.assert_array_equal(models.model_forward([[1, 2, 3]], params, cfg)[0], want)
    assert models.loss_and_grads([[1, 2, 3]], [[2, 3, 4]], params, cfg)[0] == \
        models.loss_and_grads(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]), params, cfg)[0]
    reg = models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=1, d_state=4)
    rp = models.init_params(reg)
    x = [[[0.0, 1.0], [1.0, 0.5]]]
    y = [[[1.0], [0.0]]]
    want = models.loss_and_grads(np.array(x, np.float32), np.array(y, np.float32), rp, reg)[0]
    assert models.loss_and_grads(x, y, rp, reg)[0] == want


def test_param_shapes_are_those_init_params_makes():
    for cfg in [models.MambaConfig(d_model=8, n_layers=2, vocab_size=11, d_state=4),
                models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=3, block="lti",
                                   proj_bias=True),
                models.MambaConfig(d_model=16, n_layers=3, vocab_size=7, tie_embeddings=False,
                                   conv_bias=False, dt_rank=3)]:
        params = models.init_params(cfg)
        assert {k: v.shape for k, v in params.items()} == models.param_shapes(cfg)


# ------------------------------------------------------------------ property tests
# Each draws, per argument, a dtype (byte order included), a memory layout, and
# optionally one kind of trouble: a special value (NaN, +-inf) in one argument,
# an unsupported dtype, a wrong shape.  The call must either raise a clear error
# naming the argument, or equal the float64 reference on the finite part (and be
# non-finite exactly where the reference is).

_GOOD = ["<f8", ">f8", "<f4", ">f4", "<f2", ">f2", "<i8", ">i4"]
_BAD = ["complex128", "U3", "O"]
_LAYOUTS = ["C", "F", "strided", "reversed"]
_PROPERTY = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _as(values, dtype, layout):
    """``values`` (float64) cast to ``dtype`` in the memory ``layout``."""
    a = np.asarray(values).astype(dtype)
    if a.ndim == 0 or layout == "C":
        return a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":  # every other element of a twice-as-long last axis
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    return np.ascontiguousarray(a[..., ::-1])[..., ::-1]


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _check_result(got, ref, precise, dtype):
    """``got`` equals ``ref`` where it is finite (and is non-finite elsewhere)."""
    assert got.dtype.isnative and got.dtype == dtype, (got.dtype, dtype)
    got = got.astype(np.float64)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    scale = max(1.0, float(np.abs(ref[finite]).max(initial=0.0)))
    tol = 1e-9 if precise else (4e-3 if dtype == np.float16 else 2e-4)
    tol = max(tol, 4 * float(np.finfo(dtype).eps))  # (the result's own rounding)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=tol, atol=tol * scale)


def _expect(names, call):
    """Call; an error must name one of ``names`` (a name or a tuple; returns
    None), else the result."""
    try:
        return call()
    except (TypeError, ValueError) as exc:
        assert names, f"unexpected {type(exc).__name__}: {exc}"
        text = str(exc)
        assert any(n in text.split(",")[0] or f"{n} " in text
                   for n in ((names,) if isinstance(names, str) else names)), (names, text)
        return None


_trouble = st.sampled_from(["none", "special", "dtype", "shape"])


def _inject_special(draw, values, dtypes, target):
    """A NaN or an infinity at a drawn place of ``values[target]``, stored in
    a float32 or float64 dtype of either byte order (which can hold it)."""
    v = values[target].copy()
    v.flat[draw(st.integers(0, v.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    values[target] = v
    dtypes[target] = draw(st.sampled_from(["<f8", ">f8", "<f4", ">f4"]))


@st.composite
def _scan_case(draw):
    Bt, D, N, L = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                   draw(st.integers(1, 7)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    values = dict(u=rng.standard_normal((Bt, D, L)), delta=rng.standard_normal((Bt, D, L)),
                  A=-rng.uniform(0.5, 2, (D, N)), B=rng.standard_normal((Bt, N, L)),
                  C=rng.standard_normal((D, N)), D=rng.standard_normal(D),
                  z=rng.standard_normal((Bt, D, L)), delta_bias=rng.standard_normal(D))
    trouble = draw(_trouble)
    target = draw(st.sampled_from(sorted(values)))
    dtypes = {k: draw(st.sampled_from(_GOOD)) for k in values}
    layouts = {k: draw(st.sampled_from(_LAYOUTS)) for k in values}
    error = None
    if trouble == "special":
        _inject_special(draw, values, dtypes, target)
        error = "A" if target == "A" else None
    elif trouble == "dtype":
        dtypes[target] = draw(st.sampled_from(_BAD))
        error = target
    elif trouble == "shape" and target != "u":
        v = values[target]
        axis = 0 if target == "A" else draw(st.integers(0, v.ndim - 1))
        values[target] = np.concatenate([v, v.take([0], axis=axis)], axis=axis)
        error = target
    return values, dtypes, layouts, error


@_PROPERTY
@given(_scan_case())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_property_selective_scan(case):
    values, dtypes, layouts, error = case
    args = {k: _as(v, dtypes[k], layouts[k]) for k, v in values.items()}
    got = _expect(error, lambda: nm.selective_scan(**args, delta_softplus=True))
    if got is None:
        return
    assert error is None, f"no error naming {error}"
    with np.errstate(all="ignore"):
        ref = nm.reference.selective_scan(*(_f64(args[k]) for k in ("u", "delta", "A", "B",
                                                                   "C")),
                                          D=_f64(args["D"]), z=_f64(args["z"]),
                                          delta_bias=_f64(args["delta_bias"]),
                                          delta_softplus=True)
    converted = {k: np.dtype(np.float64) if np.dtype(d).kind in "iu" else np.dtype(d)
                 for k, d in dtypes.items()}
    precise = any(d.itemsize == 8 for d in converted.values())
    _check_result(got, ref, precise, converted["u"].newbyteorder("="))
    if not all(np.isfinite(_f64(a)).all() for a in args.values()):
        return
    # the backward: each gradient in its input's (native) dtype, equal to the reference's
    event("backward compared")
    out, _, backward = nm.selective_scan_vjp(**args, delta_softplus=True)
    _check_result(out, ref, precise, converted["u"].newbyteorder("="))
    dout = np.cos(np.arange(ref.size)).reshape(ref.shape)
    grads = backward(dout.astype(converted["u"]))
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    ref_grads = nm.reference.selective_scan_vjp(
        *(_f64(args[k]) for k in order[:5]), D=_f64(args["D"]), z=_f64(args["z"]),
        delta_bias=_f64(args["delta_bias"]), delta_softplus=True)[2](
            dout.astype(converted["u"]).astype(np.float64))
    for name, g, r in zip(order, grads, ref_grads):
        _check_result(g, r, precise, converted[name].newbyteorder("="))


def _filter_reference(A, B, C, x, dt):
    """float64 'zoh' filter along the last axis: A, B, C (D, N); x (D, L)."""
    A, B, C = (np.asarray(v).astype(complex) for v in (A, B, C))
    Ab = np.exp(dt * A)
    Bb = np.where(A != 0, (Ab - 1) / np.where(A != 0, A, 1), dt) * B
    h = np.zeros(A.shape, complex)
    y = np.zeros(x.shape)
    for t in range(x.shape[-1]):
        h = Ab * h + Bb * x[:, t, None]
        y[:, t] = (C * h).sum(-1).real
    return y


@st.composite
def _filter_case(draw):
    D, N, L = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = dict(A=-rng.uniform(0.1, 2, (D, N)), B=rng.standard_normal((D, N)),
                  C=rng.standard_normal((D, N)), x=rng.standard_normal((D, L)),
                  dt=rng.uniform(0.1, 1, (D, 1)))
    trouble = draw(_trouble)
    target = draw(st.sampled_from(sorted(values)))
    dtypes = {k: draw(st.sampled_from(_GOOD)) for k in values}
    dtypes["dt"] = draw(st.sampled_from(["<f8", ">f8", "<f4", ">f4"]))  # (dt > 0 as ints: 0)
    layouts = {k: draw(st.sampled_from(_LAYOUTS)) for k in values}
    mode = draw(st.sampled_from(["auto", "scan", "conv"]))
    error = None
    if trouble == "special":
        _inject_special(draw, values, dtypes, target)
        error = {"A": "A", "dt": "dt"}.get(target)
    elif trouble == "dtype":
        bad = ["U3", "O"] + (["complex128"] if target in ("x", "dt") else [])
        dtypes[target] = draw(st.sampled_from(bad))
        error = target
    elif trouble == "shape":
        # one more state (A, B, C; the others' N of 1 would broadcast), channel (x)
        # or sample (dt: 2 samples, an error unless L is 2)
        assume(N >= 2 if target in ("A", "B", "C") else D >= 2 if target == "x" else L != 2)
        v = values[target]
        axis = 0 if target == "x" else v.ndim - 1
        values[target] = np.concatenate([v, v.take([0], axis=axis)], axis=axis)
        error = "B" if target == "A" else target  # (A's N decides how many states B has)
    return values, dtypes, layouts, mode, error


@_PROPERTY
@given(_filter_case())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_property_ssm_filter(case):
    values, dtypes, layouts, mode, error = case
    args = {k: _as(v, dtypes[k], layouts[k]) for k, v in values.items()}
    got = _expect(error, lambda: nm.ssm_filter(args["A"], args["B"], args["C"], args["x"],
                                               dt=args["dt"], mode=mode))
    if got is None:
        return
    assert error is None, f"no error naming {error}"
    if mode == "conv" and np.isfinite(_f64(args["x"])).all():
        return  # (the FFT's rounding: test_ssm_filter compares it with the scan)
    with np.errstate(all="ignore"):
        ref = _filter_reference(*(_f64(args[k]) for k in ("A", "B", "C", "x")), _f64(args["dt"]))
    x_dtype = np.dtype(np.float64) if np.dtype(dtypes["x"]).kind in "iu" else \
        np.dtype(dtypes["x"]).newbyteorder("=")
    _check_result(got, ref, x_dtype == np.float64, x_dtype)
    # streaming: two pieces and a last sample, joined, are the same filter
    event("streaming compared")
    f = nm.SSMFilter(args["A"], args["B"], args["C"], dt=args["dt"], mode=mode)
    L = args["x"].shape[-1]
    k = L // 2
    pieces = [f(args["x"][:, a:b]) for a, b in ((0, k), (k, L - 1)) if b > a]
    pieces.append(f.step(args["x"][:, L - 1])[:, None])
    _check_result(np.concatenate(pieces, axis=-1), ref, x_dtype == np.float64, x_dtype)


@st.composite
def _discretize_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = dict(A=-rng.uniform(0.1, 2, shape), B=rng.standard_normal(shape),
                  dt=rng.uniform(0.1, 1, shape[:-1] + (1,)), C=rng.standard_normal(shape))
    dtypes = {k: draw(st.sampled_from(_GOOD)) for k in values}
    dtypes["dt"] = draw(st.sampled_from(["<f8", ">f8", "<f4", ">f4"]))
    layouts = {k: draw(st.sampled_from(_LAYOUTS)) for k in values}
    trouble = draw(_trouble)
    target = draw(st.sampled_from(["A", "B", "dt"]))
    error = None
    if trouble == "special":
        _inject_special(draw, values, dtypes, target)
        error = None if target == "B" else target
    elif trouble == "dtype":
        dtypes[target] = draw(st.sampled_from(["U3", "O"] + (["complex128"] * (target == "dt"))))
        error = target
    elif trouble == "shape":
        assume(target != "dt" and shape[-1] > 2)  # (a last axis of 1 would broadcast)
        values[target] = values[target][..., :-1]
        error = target
    L = draw(st.one_of(st.integers(1, 6), st.sampled_from([0, -1, True, 2.0])))
    return values, dtypes, layouts, error, L


@_PROPERTY
@given(_discretize_case())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_property_discretize_and_ssm_kernel(case):
    values, dtypes, layouts, error, L = case
    args = {k: _as(v, dtypes[k], layouts[k]) for k, v in values.items()}
    A, B, C, dt = (_f64(args[k]) for k in ("A", "B", "C", "dt"))
    if error is None:
        with np.errstate(all="ignore"):
            Ab = np.exp(dt * A)
            Bb = np.where(A != 0, (Ab - 1) / np.where(A != 0, A, 1), dt) * B
    real = {k: np.dtype(np.float64) if np.dtype(d).kind in "iu" else np.dtype(d)
            for k, d in dtypes.items() if k != "C"}
    precise = any(d.itemsize == 8 for d in real.values())
    out = np.dtype(np.float64 if precise else np.float32)
    got = _expect(error, lambda: nm.discretize(args["A"], args["B"], args["dt"]))
    if got is not None:
        assert error is None, f"no error naming {error}"
        _check_result(got[0], Ab, precise, out)
        _check_result(got[1], Bb, precise, out)
    kernel_error = tuple(n for n in (error, None if _is_length(L) else "L") if n)
    got = _expect(kernel_error, lambda: nm.ssm_kernel(args["A"], args["B"], args["C"],
                                                      args["dt"], L))
    if got is None:
        return
    assert not kernel_error, f"no error naming {kernel_error}"
    with np.errstate(all="ignore"):
        ref = np.stack([(C * Bb * Ab ** k).sum(-1) for k in range(L)], axis=-1)
    precise = precise or np.dtype(dtypes["C"]).kind in "iu" or np.dtype(dtypes["C"]).itemsize == 8
    _check_result(got, ref, precise, np.dtype(np.float64 if precise else np.float32))


def _is_length(L):
    return isinstance(L, int) and not isinstance(L, bool) and L >= 1


# ------------------------------------------------------------------ the GPU's validation cache
from tests.test_validation_cache import FakeCupyArray, _args, fake_gpu  # noqa: E402, F401
from tests.test_validation_cache import _prepare as _prepare_fake  # noqa: E402


class _FakeWithAstype(FakeCupyArray):
    __module__ = "cupy._fake"

    def astype(self, dtype):
        return _FakeWithAstype(self.a.astype(dtype), self.data.device_id)


def test_gpu_integer_arrays_are_converted_on_every_call(fake_gpu):  # noqa: F811
    """A remembered layout skips validation, which converts integer arrays:
    their layouts are not remembered (the kernels would get the integers)."""
    kw = _args(np.random.default_rng(0), wrap=_FakeWithAstype)
    kw["u"] = _FakeWithAstype(np.arange(30).reshape(2, 3, 5) % 3 - 1)
    for calls in (1, 2):
        call = _prepare_fake(kw)
        assert call.ftype == np.float64
        assert call.args[0].dtype == call.given[0].dtype == np.float64
        assert fake_gpu["full"] == calls and not api_validated()
    kw["u"] = _FakeWithAstype(kw["u"].a.astype(np.float32))  # (floats: remembered)
    _prepare_fake(kw)
    _prepare_fake(kw)
    assert fake_gpu["full"] == 3 and len(api_validated()) == 1


def api_validated():
    import numba_mamba.scan as api

    return api._VALIDATED
