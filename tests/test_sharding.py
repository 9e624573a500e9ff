"""One SPMD program on every mesh: layouts compute the same thing, FSDP divides memory, the
PartitionSpec table is pinned, remat/scan choices do not change the math, mesh errors are one line.

The multi-device checks run in ONE subprocess with 8 fake CPU devices (tests/spmd_driver.py).
Golden PartitionSpecs live in tests/golden/; regenerate them after an intended change with
    LLMJAX_REGEN_GOLDEN=1 python -m pytest -q tests/test_sharding.py -k golden
and review the diff.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT, run_cli
from llmjax import config as cfglib
from llmjax import plan as planlib
from llmjax import sharding as shd

sys.path.insert(0, str(ROOT / "tests"))
import spmd_driver  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MULTI = [n for n in spmd_driver.DEFAULT_LAYOUTS if n != "single"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("spmd") / "run.npz")
  proc = run_cli(["tests/spmd_driver.py", out], timeout=900, env_extra={
      "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA}"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out + ".json") as f:
    info = json.load(f)
  return info, dict(np.load(out))


def _params(arrays, name):
  return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")}


@pytest.mark.parametrize("layout", MULTI)
def test_every_mesh_trains_like_one_device(driver, layout):
  info, arrays = driver
  ref, got = np.array(info["losses"]["single"]), np.array(info["losses"][layout])
  assert len(got) == spmd_driver.STEPS
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
  ref_p, got_p = _params(arrays, "single"), _params(arrays, layout)
  assert ref_p.keys() == got_p.keys() and len(ref_p) > 10
  worst = max(float(np.max(np.abs(ref_p[k] - got_p[k]))) for k in ref_p)
  assert worst <= 1e-5, f"{layout}: params differ by {worst}"
  # ...and the parameters really moved (5 steps at lr 3e-3), so equality is not vacuous.
  moved = max(float(np.max(np.abs(ref_p[k] - arrays[f"init_single/{k}"]))) for k in ref_p)
  assert moved > 1e-3


@pytest.mark.slow
def test_sequence_parallel_trains_like_one_device(tmp_path):
  """(data=2, sequence=2, tensor=2): activations split along the sequence axis."""
  out = str(tmp_path / "seq.npz")
  proc = run_cli(["tests/spmd_driver.py", out, "single,data2_sequence2_tensor2"], timeout=900,
                 env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA}"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  info, arrays = json.loads(open(out + ".json").read()), dict(np.load(out))
  np.testing.assert_allclose(info["losses"]["data2_sequence2_tensor2"], info["losses"]["single"],
                             rtol=1e-5)
  ref, got = _params(arrays, "single"), _params(arrays, "data2_sequence2_tensor2")
  assert max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref) <= 1e-5
  assert info["collectives"]["data2_sequence2_tensor2"] > 0


# -- issue 11: the encoder-decoder (T5-style) and encoder (BERT-style) families on every mesh ----------
import family_spmd_driver  # noqa: E402


def _run_families(tmp_path, families, layouts) -> dict:
  prefix = str(tmp_path / "run")
  proc = run_cli(["tests/family_spmd_driver.py", prefix, ",".join(families), ",".join(layouts)],
                 timeout=1200, env_extra={
                     "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA}"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = {}
  for family in families:
    path = f"{prefix}.{family}.npz"
    out[family] = (json.loads(open(path + ".json").read()), dict(np.load(path)))
  return out


def _check_family_layouts(family, info, arrays, layouts):
  ref = np.array(info["losses"]["single"])
  assert len(ref) == spmd_driver.STEPS and np.all(np.isfinite(ref))
  ref_p, init_p = _params(arrays, "single"), _params(arrays, "init_single")
  assert len(ref_p) > 10
  for layout in layouts:
    np.testing.assert_allclose(info["losses"][layout], ref, rtol=1e-5, atol=0, err_msg=layout)
    got_p = _params(arrays, layout)
    assert got_p.keys() == ref_p.keys()
    worst = max(float(np.max(np.abs(ref_p[k] - got_p[k]))) for k in ref_p)
    assert worst <= 1e-5, f"{family} {layout}: params differ by {worst}"
    assert info["collectives"][layout] > 0, layout  # the layout really split the work
  # The parameters really moved in 5 steps, so the equalities are not vacuous.
  assert max(float(np.max(np.abs(ref_p[k] - init_p[k]))) for k in ref_p) > 1e-3


def test_encoder_decoder_trains_like_one_device_on_a_data_fsdp_tensor_mesh(tmp_path):
  """T5-style encoder-decoder, seq2seq on packed pairs: (data=2, fsdp=2, tensor=2) gives one
  device's losses and parameters (the quick check; every layout and the encoder: -m slow)."""
  (info, arrays), = _run_families(tmp_path, ["encoder_decoder"],
                                  ["single", "data2_fsdp2_tensor2"]).values()
  _check_family_layouts("encoder_decoder", info, arrays, ["data2_fsdp2_tensor2"])


@pytest.mark.slow
def test_encoder_families_train_like_one_device_on_every_mesh(tmp_path):
  """Encoder-decoder (seq2seq on packed pairs) and BERT-style encoder (MLM + NSP): data8, fsdp8,
  fsdp4 x tensor2, data2 x fsdp2 x tensor2 and data2 x sequence2 x tensor2 give one device's
  losses and parameters; sharded init equals single-device init; FSDP divides the state."""
  layouts = list(family_spmd_driver.LAYOUTS)
  for family, (info, arrays) in _run_families(tmp_path, list(family_spmd_driver.FAMILIES),
                                               layouts).items():
    _check_family_layouts(family, info, arrays, layouts[1:])
    ref, got = _params(arrays, "init_single"), _params(arrays, "init_fsdp4_tensor2")
    assert max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref) <= 1e-7, family
    mem = info["memory"]
    assert mem["fsdp8"]["state"] <= mem["single"]["state"] / 8 * 1.05, (family, mem)


def test_sharded_init_equals_unsharded_init(driver):
  """Initializing straight into (fsdp=4, tensor=2) shardings gives the single-device values."""
  _, arrays = driver
  ref, got = _params(arrays, "init_single"), _params(arrays, "init_fsdp4_tensor2")
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-7, err_msg=k)


def test_fsdp8_divides_param_and_optimizer_memory(driver):
  info, _ = driver
  mem = info["memory"]
  state = {k: m["argument"] - m["batch"] for k, m in mem.items()}  # compiled step's inputs
  assert state["fsdp8"] <= state["single"] / 8 * 1.05, state
  # The compiled figure is exactly what the shardings say (what llmjax.plan reports).
  for name, m in mem.items():
    assert abs(state[name] - m["state"]) <= 64, (name, state[name], m["state"])
  assert state["data8"] >= 0.99 * state["single"]  # pure data parallelism replicates
  for name in MULTI:  # every multi-device layout really communicates
    assert info["collectives"][name] > 0, name


def test_scanned_and_unrolled_layers_give_identical_losses(driver):
  info, arrays = driver
  np.testing.assert_allclose(info["losses"]["unrolled"], info["losses"]["single"], rtol=1e-6)
  ref, got = _params(arrays, "single"), _params(arrays, "unrolled")
  assert max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref) <= 1e-6


def test_remat_policies_same_gradients_less_activation_memory(driver):
  info, arrays = driver
  temp = info["remat_temp"]
  ref = _params(arrays, "grads_none")
  for policy in temp:
    got = _params(arrays, f"grads_{policy}")
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=f"{policy} {k}")
    if policy != "none":
      assert temp[policy] < temp["none"], temp
  assert set(temp) == {"none", "full", "save_dots", "save_dots_no_batch"}
  assert temp["full"] < 0.5 * temp["none"], temp


def _config(**mesh):
  c = cfglib.default_config()
  c.mesh.update(mesh)
  return c


def test_activation_constraints_reach_the_compiled_program():
  """flax only applies logical constraints under jax.set_mesh (not the legacy `with mesh:`)."""
  config = spmd_driver.gpt_config()
  config.mesh.update(data=1)
  mesh = shd.make_mesh(config, jax.devices()[:1])
  built = planlib.build(config, mesh, spmd_driver.VOCAB)
  with built.scope():
    text = built.train_step.lower(built.abstract_state, built.abstract_batch()).as_text()
  assert text.count("sharding_constraint") + text.count("@Sharding") >= 4


def test_make_mesh_uses_auto_axes_and_config_order():
  mesh = shd.make_mesh(_config(data=-1), jax.devices()[:1])
  assert mesh.axis_names == cfglib.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_batch_rule_wins_over_embed_on_activations():
  """'embed'->fsdp must not reuse fsdp on activations whose batch axis already uses it."""
  rules = shd.logical_rules(cfglib.default_config())
  spec = shd.logical_to_spec(("batch", "length", "embed"), rules)
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), "sequence", None)
  assert shd.logical_to_spec(("embed", "mlp"), rules) == jax.sharding.PartitionSpec("fsdp", "tensor")
  # Rules are config data: moving the MLP to fsdp and the embedding to nothing is a config edit.
  c = cfglib.default_config()
  c.mesh.rules.embed = ""
  c.mesh.rules.mlp = "fsdp,tensor"
  assert shd.logical_to_spec(("embed", "mlp"), shd.logical_rules(c)) == \
      jax.sharding.PartitionSpec(None, ("fsdp", "tensor"))


def test_fit_spec_replicates_dimensions_that_do_not_divide():
  P = jax.sharding.PartitionSpec
  sizes = {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 4}
  assert shd.fit_spec(P("fsdp", "tensor", None), (128, 2, 64), sizes) == P("fsdp", None, None)
  assert shd.fit_spec(P(("fsdp", "tensor"),), (8,), sizes) == P("fsdp")
  assert shd.fit_spec(P("tensor",), (65,), sizes) == P(None)


@pytest.mark.parametrize("mesh, devices, slices, message", [
    (dict(data=3), 8, None, "the mesh data=3 x fsdp=1 x sequence=1 x tensor=1 multiplies to 3 but there are 8 devices"),
    (dict(data=-1, fsdp=3), 8, None, "needs a multiple of 3 devices but there are 8"),
    (dict(data=-1, fsdp=-1), 8, None, "only one mesh size may be -1"),
    (dict(data=2, fsdp=2, dcn=dict(data=2)), 16, 2, "multiplies to 4 but there are 8 devices per slice"),
    (dict(data=-1, dcn=dict(data=4)), 8, 2, "the mesh.dcn data=4 x fsdp=1 x sequence=1 x tensor=1 multiplies to 4 but there are 2 slices"),
    (dict(fsdp=0), 8, None, "mesh.fsdp=0 must be -1 or a positive integer"),
])
def test_mesh_mismatch_is_one_line_error(mesh, devices, slices, message):
  config = _config(**{k: v for k, v in mesh.items() if k != "dcn"})
  config.mesh.dcn.update(mesh.get("dcn", {}))
  with pytest.raises(cfglib.ConfigError) as e:
    cfglib.mesh_layout(config, devices, slices)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_ici_and_dcn_sizes_resolve():
  config = _config(data=1, fsdp=-1, tensor=2)
  config.mesh.dcn.update(data=-1)
  ici, dcn = cfglib.mesh_layout(config, 32, num_slices=2)
  assert ici == {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 2}
  assert dcn == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 1}
  assert cfglib.mesh_shape(config, 32, 2) == {"data": 2, "fsdp": 8, "sequence": 1, "tensor": 2}


def test_validate_checks_rules_and_parallel_divisibility():
  c = cfglib.default_config()
  c.mesh.rules.embed = "fsdp,model"
  with pytest.raises(cfglib.ConfigError, match="unknown mesh axis 'model'"):
    cfglib.validate(c)
  c = cfglib.default_config()
  c.mesh.update(data=1, sequence=8)
  c.data.update(seq_len=60, batch_size=8)
  with pytest.raises(cfglib.ConfigError, match="not divisible by mesh.sequence=8"):
    cfglib.validate(c, num_devices=8)


def test_cli_mesh_error_is_one_line():
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  "--workdir=/tmp/llmjax_unused", "--config.mesh.data=3"], devices=8, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("llmjax: error: the mesh data=3 x") and "8 devices" in last


# -- golden PartitionSpec tables --------------------------------------------------------------------
GOLDEN_MESH = {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 2}
ACTIVATIONS = [("batch", "length", "embed"), ("batch", "length", "heads", "kv"),
               ("batch", "length", "kv_heads", "kv"), ("batch", "length", "mlp"),
               ("batch", "length", "vocab")]


def _spec_json(spec):
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def partition_table(experiment: str) -> dict:
  """Logical names and mesh PartitionSpecs of every parameter of an experiment's model."""
  import flax.linen as nn
  from llmjax import train as trainlib
  from llmjax.model import Transformer
  from llmjax.optim import make_optimizer
  from llmjax.experiment import load_config
  config = load_config(experiment)
  rules = shd.logical_rules(config)
  model = Transformer(cfglib.model_config(config, planlib.default_vocab_size(config)))
  optimizer, _ = make_optimizer(config.optim, 10)
  _, boxed = trainlib.abstract_state(model, optimizer, (1, 8))
  logical = nn.get_partition_spec(boxed.params)
  shapes = nn.meta.unbox(boxed.params)
  flat_logical = jax.tree_util.tree_flatten_with_path(
      logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  flat_shapes = dict((jax.tree_util.keystr(k), v) for k, v in
                     jax.tree_util.tree_flatten_with_path(shapes)[0])
  params = {}
  for path, names in flat_logical:
    key = jax.tree_util.keystr(path)
    spec = shd.fit_spec(shd.logical_to_spec(names, rules), flat_shapes[key].shape, GOLDEN_MESH)
    params[key] = {"shape": list(flat_shapes[key].shape), "logical": list(names),
                   "spec": _spec_json(spec)}
  return {"mesh": GOLDEN_MESH, "rules": [[n, a] for n, a in rules],
          "activations": {",".join(a): _spec_json(shd.logical_to_spec(a, rules)) for a in ACTIVATIONS},
          "params": params}


@pytest.mark.parametrize("experiment", ["gpt_small", "llama_small"])
def test_golden_partition_specs(experiment):
  path = GOLDEN / f"partition_specs_{experiment}.json"
  table = json.loads(json.dumps(partition_table(experiment)))
  if os.environ.get("LLMJAX_REGEN_GOLDEN"):
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
  golden = json.loads(path.read_text())
  assert table["rules"] == golden["rules"]
  assert table["activations"] == golden["activations"]
  assert table["params"].keys() == golden["params"].keys()
  for key, want in golden["params"].items():
    assert table["params"][key] == want, key
  # Spot checks that make the table meaningful, independent of how it was generated.
  params = golden["params"]
  emb = "['token_embedding']"
  assert params[emb]["spec"] == ["tensor", "fsdp"]
  assert all("fsdp" in json.dumps(p["spec"]) for k, p in params.items() if "kernel" in k)


# -- memory planning (llmjax.plan) ----------------------------------------------------------------
def test_parse_topology():
  t = planlib.parse_topology("v5p-64")
  assert (t.num_devices, t.num_slices, t.hbm_bytes) == (32, 1, 95 * planlib.GIB)
  t = planlib.parse_topology("2xv5e-256")
  assert (t.num_devices, t.devices_per_slice, t.num_slices) == (512, 256, 2)
  assert planlib.parse_topology("h100-8").hbm_bytes == 80 * planlib.GIB
  with pytest.raises(planlib.PlanError, match="is not understood"):
    planlib.parse_topology("v9-8")
  with pytest.raises(planlib.PlanError, match="N must be even"):
    planlib.parse_topology("v4-1")


def test_plan_cli_compiles_for_a_two_slice_target(tmp_path):
  out = tmp_path / "plan.json"
  proc = run_cli(["-m", "llmjax.plan", "--config=experiments/gpt_small.py:tiny", "--topology=2xcpu-4",
                  "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.dcn.data=2",
                  f"--json={out}"], env_extra={"XLA_FLAGS": FAST_XLA}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh data=2 x fsdp=4 x sequence=1 x tensor=1 over 8 devices (cpu compile)" in proc.stdout
  for row in ("parameters", "optimizer state", "temporaries", "estimated peak"):
    assert row in proc.stdout
  report = json.loads(out.read_text())
  # gpt_small:tiny with the default sentencepiece vocabulary of its config (512 ids).
  assert report["vocab_size"] == 512 and report["devices"] == 8
  # Parameters are fsdp-sharded 4 ways (data replicates): within 5% of a quarter of fp32 params.
  assert report["params_bytes"] <= report["num_params"] * 4 / 4 * 1.05
  assert report["optimizer_bytes"] >= 2 * report["params_bytes"] * 0.95  # AdamW: mu and nu
  assert report["temp_bytes"] > 0 and report["peak_bytes"] >= report["argument_bytes"]


def test_tpu_chip_grids_follow_cloud_tpu_slice_shapes():
  grid = planlib.tpu_chip_grid
  assert [grid("v5e", n) for n in (1, 4, 8, 16, 32, 64, 256)] == [
      (1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (16, 16)]
  # v5p-8 .. v5p-1024 hold 4 .. 512 chips
  assert [grid("v5p", n) for n in (4, 8, 16, 32, 64, 128, 256, 512)] == [
      (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8)]
  with pytest.raises(planlib.PlanError, match="not a power of two"):
    grid("v5e", 24)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install 'jax[tpu]'); compiles for TPUs from a CPU host")
def test_plan_compiles_for_real_tpu_topologies_with_libtpu(tmp_path):
  """JAX's topology API with libtpu compiles for TPU chips that are not there (one slice of v5p,
  two of v5e): the TPU compiler's own memory figures."""
  for topology, mesh, devices, fsdp in (
      ("v5p-16", ["--config.mesh.fsdp=-1"], 8, 8),
      ("2xv5e-8", ["--config.mesh.fsdp=-1", "--config.mesh.dcn.data=2",
                   "--config.data.batch_size=16"], 16, 8)):
    out = tmp_path / f"{topology}.json"
    proc = run_cli(["-m", "llmjax.plan", "--config=experiments/gpt_small.py:tiny",
                    f"--topology={topology}", "--backend=tpu", "--config.mesh.data=1", *mesh,
                    f"--json={out}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "tpu" and report["devices"] == devices
    assert "(tpu compile)" in proc.stdout and "-> fits" in proc.stdout
    assert report["params_bytes"] <= report["num_params"] * 4 / fsdp * 1.05
    assert report["temp_bytes"] > 0


def test_plan_cli_bad_topology_is_one_line():
  proc = run_cli(["-m", "llmjax.plan", "--config=experiments/gpt_small.py", "--topology=v5e"])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("llmjax: error: --topology='v5e'")
