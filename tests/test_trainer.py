"""seqpar.trainer: Hugging Face Trainer and TRL SFTTrainer on 4 torchrun gloo ranks vs the plain single-process
trainers (tests/trainer_cases.py): packed batches, gradient accumulation 2, 20 optimizer steps, fp32, a plain
Llama, a sliding-window Mistral and a Qwen2 with one full and one sliding layer, cp=4 and dp=2 x cp=2; bf16
(FSDP2 MixedPrecisionPolicy) within bf16 accuracy; save at step 10 and resume; refusals on every rank; the same
run under `accelerate launch --config_file launch/accelerate_cp.yaml` (cp from the config) and under SLURM's
launch/slurm/train.sbatch (where a cluster can be started).

One reference subprocess and one torchrun job (4 ranks) for the module, plus one accelerate launch (4 ranks),
each with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("trl")
pytestmark = pytest.mark.timeout(1300)  # reference + torchrun (4 ranks) + accelerate + SLURM jobs: ~2.7 min on 2 cores

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = os.path.join(HERE, "trainer_cases.py")
P = 4
LOSS_REL = 1e-4  # every logged training loss, relative to the single process
EVAL_REL = 1e-5
PARAM_REL = 1e-4  # final parameters after 20 SGD steps, max |diff| / max |param| per tensor
GRAD_NORM_REL = 1e-5  # the global (clipped-over) gradient norm of every step
BF16_EPS = 2.0 ** -8  # bf16's unit roundoff


def _quiet() -> dict[str, str]:
    return dict(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_VERBOSITY="error")


def _env():
    env = dict(os.environ, **_quiet())
    for key in [k for k in env if k.startswith(("ACCELERATE_", "PARALLELISM_CONFIG_"))]:
        env.pop(key)  # the launches below set their own
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain single-process trainers (no seqpar): their JSON and final parameters in the returned folder."""
    out = str(tmp_path_factory.mktemp("trainer"))
    subprocess.run([sys.executable, CASES, "reference", out], check=True, env=_env(), timeout=400,
                   stdout=subprocess.DEVNULL)
    return out


def _tool(name: str) -> str:
    return shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)


def _launched(out: str) -> list[dict]:
    ranks = []
    for r in range(P):
        with open(os.path.join(out, f"launched_rank{r}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@pytest.fixture(scope="module")
def results(reference):
    out = reference
    torchrun = _tool("torchrun")
    proc = subprocess.run([torchrun, "--standalone", f"--nproc-per-node={P}", CASES, "seqpar", out], env=_env(),
                          timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(os.path.join(out, "reference.json")) as f:
        ref = json.load(f)
    ranks = []
    for r in range(P):
        with open(os.path.join(out, f"seqpar_rank{r}.json")) as f:
            ranks.append(json.load(f))
    return ref, ranks


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize("config", ["trainer_llama", "trainer_mistral", "trainer_qwen2", "sft_mistral"])
@pytest.mark.parametrize("mesh", ["cp4_dp1", "cp2_dp2"])
def test_same_as_single_process(results, config, mesh):
    """Every logged loss (steps 1..20, accumulation 2, global-token mean), the eval loss, the final parameters and the
    logged token counts equal the plain single-process Trainer / SFTTrainer with the same global batch and seed."""
    ref, ranks = results
    want = ref[config]
    for rank, res in enumerate(ranks):
        got = res[f"{config}_{mesh}"]
        if rank != 0:  # logs are written by rank 0 only (once per job)
            continue
        assert sorted(int(s) for s in got["losses"]) == list(range(1, 21)), got["losses"]
        worst = max(_rel(got["losses"][k], v) for k, v in want["losses"].items())
        print(f"{config} {mesh}: max rel loss diff {worst:.2e}, eval {_rel(got['eval_loss'], want['eval_loss']):.2e}, "
              f"params {got['param']:.2e}")
        assert worst <= LOSS_REL, (config, mesh, got["losses"], want["losses"])
        assert _rel(got["eval_loss"], want["eval_loss"]) <= EVAL_REL, (got["eval_loss"], want["eval_loss"])
        assert got["param"] <= PARAM_REL, got["param"]
        grad = max(_rel(got["grad_norms"][k], v) for k, v in want["grad_norms"].items())
        assert grad <= GRAD_NORM_REL, (got["grad_norms"], want["grad_norms"])  # global norm
        assert got["compute_dtypes"] == [["torch.float32", "torch.float32"]], got["compute_dtypes"]
        # the tokens logged: Trainer's num_input_tokens_seen (each cp group's batch once, not cp times) and TRL's
        # num_tokens (the real tokens, not shard_batch's end padding), equal to the single process's at every step
        assert got["tokens_seen"] == want["tokens_seen"] and len(want["tokens_seen"]) == 20, (got["tokens_seen"],
                                                                                                want["tokens_seen"])
        if config.startswith("sft"):
            assert got["num_tokens"] == want["num_tokens"] and len(want["num_tokens"]) == 20, (got["num_tokens"],
                                                                                               want["num_tokens"])


def test_bf16_is_fsdp_mixed_precision(results):
    """args.bf16=True: the blocks compute in bf16 (FSDP2's MixedPrecisionPolicy: bf16 weights and activations), and
    the 3 logged losses are as close to the fp32 single process as single-process bf16 (autocast) is, within a few
    bf16 roundoffs of it; the same seqpar run without bf16 stays fp32 and equals the fp32 single process."""
    ref, ranks = results
    got, got32 = ranks[0]["short_trainer_llama_bf16"], ranks[0]["short_trainer_llama_fp32"]
    want, want32 = ref["short_trainer_llama_bf16"], ref["short_trainer_llama_fp32"]
    assert got["compute_dtypes"] == [["torch.bfloat16", "torch.bfloat16"]], got["compute_dtypes"]
    assert want["compute_dtypes"] == [["torch.float32", "torch.bfloat16"]], want["compute_dtypes"]  # autocast
    assert got32["compute_dtypes"] == [["torch.float32", "torch.float32"]], got32["compute_dtypes"]
    steps = sorted(want32["losses"])
    assert sorted(got["losses"]) == steps == [str(s) for s in range(1, 4)], got["losses"]
    ref_err = max(_rel(want["losses"][s], want32["losses"][s]) for s in steps)  # single-process bf16 vs fp32
    err = max(_rel(got["losses"][s], want32["losses"][s]) for s in steps)
    vs_bf16 = max(_rel(got["losses"][s], want["losses"][s]) for s in steps)
    print(f"bf16: seqpar vs fp32 {err:.2e}, single-process bf16 vs fp32 {ref_err:.2e}, seqpar vs it {vs_bf16:.2e}")
    assert 0 < err <= 2 * ref_err + BF16_EPS / 16, (got["losses"], want["losses"], want32["losses"])
    assert vs_bf16 <= BF16_EPS / 4, (got["losses"], want["losses"])
    assert max(_rel(got32["losses"][s], want32["losses"][s]) for s in steps) <= LOSS_REL, got32["losses"]


def test_resume(results):
    """Saved at step 10 (full model + full optimizer state), a fresh trainer resumed from checkpoint-10: steps 11..20
    equal the uninterrupted run, and so do the final parameters."""
    _, ranks = results
    whole, resumed = ranks[0]["trainer_llama_cp2_dp2"], ranks[0]["trainer_llama_cp2_dp2_resumed"]
    steps = [str(s) for s in range(11, 21)]  # (1..10 come back from the checkpoint's trainer_state.json)
    assert set(steps) <= set(resumed["losses"]), resumed["losses"]
    for s in steps:
        assert _rel(resumed["losses"][s], whole["losses"][s]) <= 1e-6, (s, resumed["losses"], whole["losses"])
    assert abs(resumed["param"] - whole["param"]) <= 1e-6


def test_refusals_on_every_rank(results):
    """A cp that does not divide the world, a collator output seqpar cannot shard, a model parallelize refuses:
    a ValueError / TypeError naming the problem on every rank, before any optimizer step."""
    _, ranks = results
    for res in ranks:
        ref = res["refusals"]
        assert ref["cp3"] and "cp=3 does not divide the world size 4" in ref["cp3"], ref
        assert ref["collator"] and "cannot be sharded along the sequence" in ref["collator"], ref
        assert "input_ids" in ref["collator"] and ref["collator_steps"] == 0, ref
        assert ref["model"] and "MultiheadAttention" in ref["model"], ref
        assert ref["fsdp"] and "set up for FSDP" in ref["fsdp"], ref  # seqpar shards the model itself
        assert ref["precision"] and "precision']='fp32'" in ref["precision"] and "'bf16'" in ref["precision"], ref


def test_accelerate_config_sizes():
    """The accelerate config's parallelism_config (as `accelerate launch` exports it): cp read from it, tp / sp
    refused by name, data-parallel sizes that disagree with world // cp refused (no processes: the env is a dict)."""
    from seqpar.trainer import _check_accelerate_sizes, cp_from_accelerate

    env = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_CP_SIZE": "2",
           "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "1", "PARALLELISM_CONFIG_DP_SHARD_SIZE": "1",
           "PARALLELISM_CONFIG_TP_SIZE": "1", "PARALLELISM_CONFIG_SP_SIZE": "1"}
    assert cp_from_accelerate(env) == 2
    assert cp_from_accelerate({**env, "ACCELERATE_USE_PARALLELISM_CONFIG": "false"}) is None
    assert cp_from_accelerate({}) is None
    with pytest.raises(ValueError, match="PARALLELISM_CONFIG_CP_SIZE='two'"):
        cp_from_accelerate({**env, "PARALLELISM_CONFIG_CP_SIZE": "two"})
    _check_accelerate_sizes(env, 2)
    _check_accelerate_sizes({**env, "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2"}, 2)  # = world // cp: FSDP2 over dp
    with pytest.raises(ValueError, match="dp_shard_size = 4, but world // cp = 2"):
        _check_accelerate_sizes({**env, "PARALLELISM_CONFIG_DP_SHARD_SIZE": "4"}, 2)
    for name in ("TP", "SP"):
        with pytest.raises(ValueError, match=f"parallelism_config_{name.lower()}_size=2"):
            _check_accelerate_sizes({**env, f"PARALLELISM_CONFIG_{name}_SIZE": "2"}, 2)


def _check_launched(out: str, want: dict, cp: int) -> None:
    """A launched short run (4 ranks, dp = 4 // cp): cp as configured, every logged loss and the eval loss equal the
    single process."""
    ranks = _launched(out)
    for res in ranks:
        assert (res["world"], res["cp"], res["dp"]) == (P, cp, P // cp), res
    got = ranks[0]
    assert sorted(got["losses"]) == sorted(want["losses"]) == ["1", "2", "3"], (got["losses"], want["losses"])
    worst = max(_rel(got["losses"][s], want["losses"][s]) for s in want["losses"])
    print(f"launched cp={cp}: max rel loss diff {worst:.2e}, eval {_rel(got['eval_loss'], want['eval_loss']):.2e}")
    assert worst <= LOSS_REL, (got["losses"], want["losses"])
    assert _rel(got["eval_loss"], want["eval_loss"]) <= EVAL_REL, (got["eval_loss"], want["eval_loss"])


def test_accelerate_launch(reference, tmp_path):
    """`accelerate launch --config_file launch/accelerate_cp.yaml` starts 4 CPU ranks (distributed_type MULTI_GPU +
    use_cpu: torchrun underneath); the Trainer takes cp=2 from the config's parallelism_config_cp_size (dp=2) without
    accelerate applying (or refusing) a context-parallel config of its own: losses equal the single process."""
    with open(os.path.join(reference, "reference.json")) as f:
        want = json.load(f)["short_launched"]
    out = str(tmp_path)
    cmd = [_tool("accelerate"), "launch", "--config_file", os.path.join(ROOT, "launch", "accelerate_cp.yaml"),
           "--main_process_port", "0", CASES, "launched", out]
    proc = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    _check_launched(out, want, cp=2)


def test_slurm_train_sbatch(reference, slurm, tmp_path):
    """launch/slurm/train.sbatch (one srun task per node running torchrun, 4 ranks) with cp=2 from the command line:
    losses equal the single process (a one-node cluster: launch/local_cluster.sh, tests/conftest.py)."""
    from test_slurm import _sbatch

    with open(os.path.join(reference, "reference.json")) as f:
        want = json.load(f)["short_launched"]
    out = str(tmp_path)
    rc, log = _sbatch(slurm, "launch/slurm/train.sbatch", CASES, "launched", out, "2",
                      extra_env={"GPUS_PER_NODE": str(P), "TORCHRUN": _tool("torchrun"), **_quiet()}, timeout=400)
    assert rc == 0, log
    assert f"1 node(s) x {P}" in log, log
    _check_launched(out, want, cp=2)
