"""internal_rl.py: a single-file, CPU-sized reference implementation of

    "Emergent temporal abstractions in autoregressive models enable hierarchical reinforcement learning"
    Kobayashi, Schimpf, Schlegel, ..., Meulemans, Sacramento (2025), arXiv:2512.20605.

Read it top to bottom; every section is one step of the paper's pipeline.

The pipeline (section numbers of this file in brackets)
------------------------------------------------------
    expert trajectories (no rewards, no labels)                                [3]
            |  next-action prediction + lambda * next-observation prediction (Eq. 5)
            v
    causal transformer  o_{1:t} -> e_{t,0} -> block 1 -> ... -> block L -> a_t  [4, 6]
            |                                  ^
            |  e_{t,l} (the residual stream)   |  e <- e + U e  (a linear controller, Eq. 1)
            v                                  |
    linear probes: is the current subgoal    ground-truth controllers: one U per subgoal,
    linearly decodable at layer l? [7]       switched by the true subgoal, steer the frozen
                                             model through unseen subgoal orders [8]
            |
            v
    metacontroller: learns, without labels, a sequence of controllers U_t = f_hyp(z_t)  [10]
    and when to switch between them (beta_t), from the frozen model's residual stream
            |
            v
    internal RL: a causal policy picks z only when the frozen switch fires; the frozen   [11]
    model acts. Compared with RL on primitive actions (token-level RL) [9] on a task whose
    subgoal order pretraining never showed.

Commands (2-core CPU)
---------------------
    python internal_rl.py --task grid                              # every stage
    python internal_rl.py --task grid --stop-after pretrain        # or: probe, controllers, metacontroller
    python internal_rl.py --task grid --seed 1 --out runs/grid-seed1
    python internal_rl.py --task ant                               # MuJoCo ant: stages up to controllers so far
    python -m pytest -q test_internal_rl.py                        # the tests, about a minute
Outputs go to ``--out`` (default ``runs/<task>-seed<seed>``): checkpoints (``*.pt``), ``metrics.jsonl``
(one JSON line per log line), figures (``*.png``) and ``results.json``. A rerun with the same settings
reuses every finished stage; changing a setting retrains the stages it affects and everything after.

What to expect (measured on a 2-core CPU, seeds 0 and 1, defaults; the README has the full table)
    40-45 min in all (pretraining 21-24 min). Held-out action NLL 0.316. Probe accuracy for the current
    subgoal 0.40 at the input embedding -> 0.66 at layer L/2 (chance 0.25). Ground-truth controllers at layer
    L/2 succeed on 0.39 of pretraining-task episodes (base model alone 0.06), but not yet on the post-training
    task (0.002; the paper reports about 0.5-0.7). The metacontroller's switches match the true subgoal
    boundaries with F1 0.999 on seed 1 (0.159 on seed 0). No RL method sees a post-training success in
    24,576 episodes yet (token-level, internal, internal with beta = 1: all 0.000): at CPU scale the base
    model's steerability through unseen subgoal orders is the limit (README).
    The ant (--task ant, stages up to controllers): ~47 min; the imitation improves steadily but no
    subgoal code emerges yet (probes at chance), so controllers do not steer (README).

Table of contents (the section banners below carry the same numbers; log lines are prefixed with them)
    1. Args: every setting, with per-task defaults
    2. Plumbing: seeding, logging, checkpoints that know their settings
    3. Data: expert trajectories D and D*, length-bucketed batches
    4. The base model: a causal transformer with an explicit residual stream
    5. Rollouts: the frozen model (optionally controlled) acting in the env, with a KV cache
    6. Stage "pretrain": next-action prediction (Eq. 5)
    7. Stage "probe": linear probes of the current subgoal, per layer (Sec. 5.1 of PAPER.md, Fig. 3)
    8. Stage "controllers": ground-truth residual-stream controllers (Eq. 1, Fig. 4)
    9. The RL toolkit and token-level RL (PPO-style, no critic, one advantage per trajectory)
    10. Stage "metacontroller": the non-causal abstraction model (Eq. 2-3)
    11. Stage "rl": internal RL (Alg. 1-3), its forced-switching ablation, and token-level RL
    12. Figures
    13. main(): the stages in order

Notation (shape comments use these letters)
    B batch (episodes)   T time steps   D residual width (n_embd)   L blocks (n_layer)   H heads
    K subgoals (4: colour pairs in the grid, colours on the ant)   r controller rank (16)   Z code size (n_z = 8)   e_{t,l} residual at step t after block l
    (l = 0 is the input embedding, l = L the last block)   U a D x D controller matrix, applied e <- e + U e

Deliberate choices and deviations from the paper (also listed in the README)
    * Size: d=64, 4 blocks, 4 heads (paper: d=256, 6 blocks) and ~1.2e6 training episodes (paper ~2.6e8):
      the CPU budget (d=64 trains 2.7x faster per CPU-second than d=128). The controlled layer is
      L/2 = 2, as in the paper. Pretraining ends with a linear learning-rate cool-down (paper: constant).
    * Input embedding (the paper leaves it open): the observation's one-hot is re-indexed around the agent
      (where is each object relative to me?) and embedded linearly, plus an embedding of the agent's cell.
      A deterministic function of the observation with no task information; it made the subgoal code
      emerge ~8x faster per CPU-second than a linear embedding of the flat 637-dim vector (PAPER.md 13).
    * Next-observation loss: cross-entropy on the agent's next cell (the only part of o_{t+1} that changes).
    * Optimiser steps, probe, controller and metacontroller training are shorter than Tables A4/A6/A7/A9,
      with larger learning rates (the values are in Args); alpha ramps up over the first 30% of the
      metacontroller's steps (without it the posterior collapsed). RL: 24,576 episodes per method.
    * Sequence embedder, history GRU and z-policy are GRUs (the paper: Hawk SSMs).
    * The ant (ant_tasks.py): the same transformer (the paper: a Hawk SSM) with a linear input embedding
      and a Gaussian action head (state-independent std); a hand-designed expert instead of a PPO agent;
      D is a stored set of successful episodes. The metacontroller and RL stages do not run on it yet.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gridworld as gw


# ---------------------------------------------------------------------------------------------------
# 1. Args: every setting, with per-task defaults
# ---------------------------------------------------------------------------------------------------
# Every tunable number of the file lives here, grouped by the section that uses it; `--help` prints the
# same text. Per-task overrides sit in TASK_PRESETS just below, so the grid and (later) ant defaults can
# be compared in one place. The defaults are what the README's numbers were measured with.
def arg(default, help: str):
    """A dataclass field that carries its own --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # -- run --
    task: str = arg("grid", "environment: grid (gridworld-pinpad) or ant (ant-pinpad; stages up to controllers so far)")
    seed: int = arg(0, "seed for everything (data, init, evaluation episodes)")
    device: str = arg("auto", "cpu, cuda, or auto (cuda when present)")
    out: str = arg("", "run folder (default runs/<task>-seed<seed>)")
    stop_after: str = arg("rl", "last stage to run: pretrain, probe, controllers, metacontroller or rl")
    threads: int = arg(0, "torch CPU threads (0 = all cores)")
    log_every: int = arg(200, "log a training line every this many steps")
    # -- data (section 3) --
    epsilon: float = arg(0.0, "expert noise for dataset D: probability of a random non-terminating action (paper: 0)")
    batch_size: int = arg(128, "episodes per pretraining batch (padded; batches are length-bucketed)")
    bucket_batches: int = arg(8, "batches generated together and sorted by length, to cut padding")
    n_heldout: int = arg(2000, "held-out episodes of D (pretraining metrics)")
    n_dstar: int = arg(8000, "episodes of the clean set D* (epsilon = 0) for controllers; as many again held out")
    n_train: int = arg(0, "episodes of a stored dataset D, reused every epoch (ant); 0 = fresh episodes every step (grid)")
    action_noise: float = arg(0.0, "ant: std of Gaussian noise on the expert's actions in D (D* never has any)")
    workers: int = arg(2, "processes that generate stored expert episodes (ant; one training job per machine)")
    # -- base model (section 4) --
    n_layer: int = arg(4, "transformer blocks L (paper: 6)")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(64, "residual width D (paper: 256)")
    mlp_mult: int = arg(4, "MLP hidden = mlp_mult * n_embd (ReLU, as Table A16)")
    rel_buckets: int = arg(32, "relative-position attention-bias buckets (Table A16: 32)")
    rel_max_distance: int = arg(128, "distance where the last (shared) bias bucket starts; see relative_buckets()")
    # -- pretraining (section 6) --
    pretrain_steps: int = arg(9600, "optimiser steps; every batch is fresh expert data")
    lr: float = arg(2e-3, "AdamW learning rate (Table A4: 3e-4 at batch 1024)")
    warmup: int = arg(200, "linear learning-rate warm-up steps, then constant (Table A4: constant)")
    cooldown: float = arg(0.3, "fraction of the final steps over which the learning rate decays linearly to 0")
    weight_decay: float = arg(0.03, "AdamW weight decay (Table A4)")
    obs_coef: float = arg(0.01, "lambda in Eq. 5: weight of the next-observation loss (Table A4: [0, 0.01])")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    eval_every: int = arg(1000, "held-out metrics + a quick probe every this many pretraining steps")
    quick_probe_episodes: int = arg(1000, "held-out D* episodes for the quick probe during pretraining")
    quick_probe_steps: int = arg(200, "probe steps of that quick probe")
    # -- probes (section 7) --
    n_probe: int = arg(4000, "held-out D* episodes for the probes (half to fit, half to score)")
    probe_steps: int = arg(300, "full-batch AdamW steps per layer probe")
    probe_lr: float = arg(5e-2, "probe learning rate (features are standardised; 1e-2 under-fits in 300 steps)")
    # -- controllers (section 8) --
    ctrl_rank: int = arg(16, "rank r of each controller U = A B^T (Table A7: 16); 0 = full rank D (Table A8, ant)")
    ctrl_steps: int = arg(400, "optimiser steps per layer (Table A7: 3200 at batch 512; ours plateau by ~300)")
    ctrl_batch: int = arg(128, "episodes of D* per controller batch")
    ctrl_lr: float = arg(3e-3, "controller learning rate (Table A7: 1e-3)")
    ctrl_layers: str = arg("all", "layers to train controllers at: 'all' (0..L), 'mid' (L/2) or a comma list, e.g. '1,2'")
    n_eval: int = arg(500, "evaluation episodes per task family (pretraining tasks / post-training task)")
    greedy: bool = arg(False, "evaluate with argmax actions instead of sampling (the paper samples)")
    # -- the RL toolkit and token-level RL (section 9) --
    rl_episodes: int = arg(24576, "training episodes per RL method (all three get the same budget)")
    rl_batch: int = arg(256, "episodes per RL batch B (Table A13: 1024)")
    rl_epochs: int = arg(2, "optimiser steps per batch (full-batch PPO epochs; the paper does not say)")
    clip_coef: float = arg(0.2, "PPO ratio clip epsilon (the paper does not say; 0.2 as usual)")
    token_lr: float = arg(1e-5, "AdamW learning rate of token-level RL, whole base model (Table A13 scan: 3e-6..3e-4)")
    rl_eval: int = arg(1000, "post-training episodes of each final evaluation, on env seeds unused in training")
    # -- the metacontroller (section 10) --
    alpha: float = arg(0.1, "KL strength alpha in Eq. 3 (Table A9 sweeps 0..1; the README has our sweep)")
    n_z: int = arg(8, "size of the controller code z (Table A9: 8)")
    mc_hidden: int = arg(32, "history GRU, sequence embedding and decoder hidden sizes (Table A9: 32)")
    mc_enc_hidden: int = arg(64, "encoder and switching-unit MLP hidden size (Table A9: encoder 64)")
    mc_steps: int = arg(2000, "metacontroller optimiser steps (Table A9: 64,000 at batch 512)")
    mc_batch: int = arg(128, "D* episodes per metacontroller batch")
    mc_lr: float = arg(3e-3, "metacontroller learning rate (Table A9: 1e-3)")
    mc_kl_warmup: float = arg(0.3, "fraction of the steps over which alpha ramps up from 0 (the paper: none)")
    mc_gumbel: float = arg(0.0, "Gumbel-sigmoid temperature of beta in training, 0 = plain sigmoid (paper: plain; "
                                "Gumbel for its grid rate-distortion plot)")
    # -- internal RL (section 11) --
    irl_lr: float = arg(1e-3, "AdamW learning rate of the internal-RL policy (Table A13: 3e-5 after a scan)")
    irl_hidden: int = arg(64, "GRU width of the causal z-policy (Table A13: a 1-layer SSM of width 256)")


# Per-task defaults: everything not listed here takes the dataclass default above.
TASK_PRESETS = {
    "grid": {},
    # The ant's expert is ~2,000 env steps/s (the grid's ~200,000), so D is a stored set, generated once
    # by ``workers`` processes and reused for epochs; episodes are ~270 steps, so batches hold fewer.
    # Controllers are full-rank on the ant (Table A8). The metacontroller and RL stages are not there yet.
    "ant": dict(n_train=3000, action_noise=0.03, n_heldout=200, n_dstar=400, n_embd=128, batch_size=16,
                pretrain_steps=3000, lr=1e-3, obs_coef=0.0, eval_every=500, log_every=100, quick_probe_episodes=200,
                n_probe=400, ctrl_rank=0, ctrl_batch=16, ctrl_steps=400, ctrl_layers="mid", n_eval=100,
                stop_after="controllers"),
}
STAGES = ("pretrain", "probe", "controllers", "metacontroller", "rl")


def parse_args(argv=None) -> Args:
    """Build argparse from the dataclass, apply the task preset, validate; bad input exits in one line."""
    p = argparse.ArgumentParser(description="Internal RL reference implementation (arXiv 2512.20605).")
    for f in dataclasses.fields(Args):
        name = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(name, type=typ, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default {f.default!r})")
    given = vars(p.parse_args(argv))
    task = given.get("task", Args.task)
    if task not in TASK_PRESETS:
        sys.exit(f"internal_rl.py: error: unknown --task {task!r}; valid choices: {', '.join(TASK_PRESETS)}")
    args = Args(**{**TASK_PRESETS[task], **given})
    if args.stop_after not in STAGES:
        sys.exit(f"internal_rl.py: error: unknown --stop-after {args.stop_after!r}; valid choices: {', '.join(STAGES)}")
    if task == "ant" and STAGES.index(args.stop_after) > STAGES.index("controllers"):
        sys.exit("internal_rl.py: error: --task ant runs the stages up to --stop-after controllers for now (the "
                 "metacontroller and RL on the ant are still to come); drop --stop-after or use pretrain, probe, controllers")
    if task == "grid" and args.ctrl_rank == 0:
        sys.exit("internal_rl.py: error: --ctrl-rank 0 (full rank) is for the ant; the grid's controllers and "
                 "metacontroller decoder need a rank, e.g. 16")
    for f in dataclasses.fields(Args):
        v = getattr(args, f.name)
        may_be_zero = ("seed", "epsilon", "obs_coef", "weight_decay", "warmup", "cooldown", "threads", "alpha",
                       "mc_kl_warmup", "mc_gumbel", "n_train", "action_noise", "ctrl_rank")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if v < 0 or (v == 0 and f.name not in may_be_zero):
                need = "non-negative" if f.name in may_be_zero else "positive"
                sys.exit(f"internal_rl.py: error: --{f.name.replace('_', '-')} must be {need}, got {v}")
    if not args.cooldown <= 1.0:
        sys.exit(f"internal_rl.py: error: --cooldown is a fraction of the steps in [0, 1], got {args.cooldown}")
    if args.n_probe < 2 or args.quick_probe_episodes < 2:
        sys.exit("internal_rl.py: error: --n-probe and --quick-probe-episodes need at least 2 episodes (half fit, half score)")
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        sys.exit(f"internal_rl.py: error: --device {args.device!r} is not available here; valid choices: auto, cpu"
                 + (", cuda" if torch.cuda.is_available() else " (no CUDA device found)"))
    if args.task == "grid" and args.n_train:
        sys.exit("internal_rl.py: error: --n-train is for the ant; the grid draws fresh expert episodes every step")
    if args.task == "ant" and not args.n_train:
        sys.exit("internal_rl.py: error: --task ant needs a stored dataset: --n-train must be positive")
    if not 0.0 <= args.epsilon < 1.0:
        sys.exit(f"internal_rl.py: error: --epsilon must be in [0, 1), got {args.epsilon}")
    if args.n_embd % args.n_head:
        sys.exit(f"internal_rl.py: error: --n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    try:
        ctrl_layers(args)
    except ValueError as e:
        sys.exit(f"internal_rl.py: error: {e}")
    args.out = args.out or os.path.join("runs", f"{args.task}-seed{args.seed}")
    return args


def ctrl_layers(args: Args) -> list:
    if args.ctrl_layers == "all":
        return list(range(args.n_layer + 1))
    if args.ctrl_layers == "mid":
        return [args.n_layer // 2]
    try:
        layers = [int(s) for s in args.ctrl_layers.split(",")]
    except ValueError:
        layers = [-1]
    if any(not 0 <= l <= args.n_layer for l in layers):
        raise ValueError(f"--ctrl-layers must be 'all', 'mid' or layers in 0..{args.n_layer}, got {args.ctrl_layers!r}")
    return layers


# ---------------------------------------------------------------------------------------------------
# 2. Plumbing: seeding, logging, checkpoints that know their settings          # BOILERPLATE
# ---------------------------------------------------------------------------------------------------
# Nothing in this section is part of the method; it is here so that runs are reproducible (one seed fixes
# every number on the CPU), observable (a log line with throughput and ETA at fixed intervals, the same
# lines as JSON in metrics.jsonl) and restartable (each stage saves a checkpoint tagged with a fingerprint
# of the settings it depends on; a rerun reuses it, a changed setting retrains it and what follows).
class Logger:
    """Print-first logging: one fixed-format line per event, also appended to metrics.jsonl."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.jsonl")

    def __call__(self, stage: str, msg: str, **metrics):
        print(f"[{stage}] {msg}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), "stage": stage, "msg": msg, **metrics}) + "\n")


def eta(t0: float, done: int, total: int) -> str:
    """'12.3 s, eta 45 s' style progress string."""
    el = time.time() - t0
    left = el / max(done, 1) * (total - done)
    return f"{el:.0f}s elapsed, eta {left:.0f}s"


# Which Args fields each stage depends on, and which stage's output it builds on. A stage's fingerprint
# hashes these plus the fingerprint of that parent stage, so changing e.g. --lr retrains everything, while
# changing --ctrl-lr retrains only the controllers (nothing else reads them).
STAGE_PARENT = {"pretrain": None, "probe": "pretrain", "controllers": "pretrain", "metacontroller": "pretrain",
                "rl": "metacontroller"}
STAGE_FIELDS = {
    "pretrain": ("task", "seed", "epsilon", "n_heldout", "batch_size", "bucket_batches", "n_layer", "n_head", "n_embd",
                 "mlp_mult", "rel_buckets", "rel_max_distance", "pretrain_steps", "lr", "warmup", "cooldown", "weight_decay", "obs_coef",
                 "grad_clip"),
    "probe": ("n_dstar", "n_probe", "probe_steps", "probe_lr"),
    "controllers": ("n_dstar", "ctrl_rank", "ctrl_steps", "ctrl_batch", "ctrl_lr", "ctrl_layers", "n_eval", "greedy"),
    "metacontroller": ("n_dstar", "alpha", "n_z", "mc_hidden", "mc_enc_hidden", "ctrl_rank", "mc_steps", "mc_batch",
                       "mc_lr", "mc_kl_warmup", "mc_gumbel", "bucket_batches"),
    "rl": ("rl_episodes", "rl_batch", "rl_epochs", "clip_coef", "token_lr", "rl_eval", "irl_lr", "irl_hidden"),
}


# Fields only the ant reads enter only the ant's fingerprints (so adding them kept grid checkpoints valid).
ANT_FIELDS = {"data": ("task", "seed", "n_train", "action_noise", "n_heldout", "n_dstar"),
              "pretrain": ("n_train", "action_noise")}


def fingerprint(args: Args, stage: str) -> str:
    prev = "" if STAGE_PARENT.get(stage) is None else fingerprint(args, STAGE_PARENT[stage])
    cfg = {k: getattr(args, k) for k in STAGE_FIELDS.get(stage, ()) + (ANT_FIELDS.get(stage, ()) if args.task == "ant" else ())}
    return hashlib.sha1((prev + json.dumps(cfg, sort_keys=True)).encode()).hexdigest()[:12]


def save_ckpt(path: str, obj: dict) -> None:
    """Atomic save: write a temporary file, then rename, so a crash never leaves half a checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: str, fp: str, log: Logger, stage: str):
    """The checkpoint at ``path`` if it was made with the same settings (fingerprint), else None.

    An unreadable file stops the run with the path and the fix; a file made with other settings is
    reported and retrained (never silently used)."""
    if not os.path.exists(path):
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and "fingerprint" in ck
    except Exception as e:  # noqa: BLE001 -- any failure to read means the same thing to the user
        sys.exit(f"internal_rl.py: error: cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:80]}); "
                 f"delete it (or choose another --out) to retrain that stage")
    if ck["fingerprint"] != fp:
        log(stage, f"{path} was made with other settings ({ck['fingerprint']} != {fp}): retraining this stage")
        return None
    return ck


def load_weights(model: nn.Module, ck: dict, path: str) -> None:
    """load_state_dict, but a mismatch (a checkpoint from other code) names the file and the fix."""
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError) as e:
        sys.exit(f"internal_rl.py: error: checkpoint {path} does not fit this code's model ({str(e)[:80]}); "
                 f"delete it (or choose another --out) to retrain that stage")


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def env_module(task: str):
    """The env file of a task: gridworld.py, or ant_tasks.py (imported only for the ant)."""
    if task == "grid":
        return gw
    import ant_tasks
    return ant_tasks


# ---------------------------------------------------------------------------------------------------
# 3. Data: expert trajectories D and D*, length-bucketed batches               [P App. C.1.1, C.4.4]
# ---------------------------------------------------------------------------------------------------
# D: expert trajectories on the 16 pretraining tasks (the expert may be epsilon-noisy); used to pretrain.
# D*: the same, always with epsilon = 0 ("more optimal"); used for controllers (and, next, the
#     metacontroller), which the paper finds need cleaner demonstrations than the base model does.
# With the default epsilon = 0 the two are equally distributed but drawn from separate random streams.
# Each episode is stored compactly (gridworld.expert_episode):
#   cells    (T+1, 13) int  observation o_1..o_{T+1} in index form: cells of walls 0..3, colours 0..7, agent
#   actions  (T,)      int  a_1..a_T
#   subgoals (T,)      int  ground-truth subgoal g_t (analysis only: probes, controllers, diagnostics)
#   optimal  (T, 4)    bool every optimal action at t (diagnostics only)
# The flat 637-dim one-hot of the paper has exactly one 1 per channel, so the 13 indices are the same
# observation, losslessly and ~50x smaller. Pretraining never reuses an episode: every batch is freshly
# generated (the expert is fast), which avoids overfitting at CPU scale. Held-out sets come from their
# own random streams, so the train/held-out split is by episode.
#
# The ant (ant_tasks.expert_episode) stores obs (T+1, 41) float, actions (T, 8) float and subgoals (T,)
# (the next colour). Its expert runs MuJoCo at ~2,000 steps/s, so D is a stored set of --n-train
# successful episodes (the paper's D holds successful trajectories only), generated once by --workers
# processes, cached in the run folder (data.pt) and reused for epochs. D (action noise) and D* (none).

def generate_episodes(rng: np.random.Generator, n: int, tasks, epsilon: float) -> list:
    """n expert episodes, each on a task drawn uniformly from ``tasks``."""
    return [gw.expert_episode(rng, tasks[int(rng.integers(len(tasks)))], epsilon) for _ in range(n)]


def collate(episodes: list, device) -> dict:
    """Pad a list of episodes into tensors; ``mask`` marks real steps (grid targets are also -1 at padding).

    Grid: obs (B, T, 13) int, actions (B, T) int, next_obs (B, T) = the agent's cell in o_{t+1}, plus
    next_colour and optimal (diagnostics). Ant: obs (B, T, 41), actions (B, T, 8), next_obs (B, T, 41)."""
    B, T = len(episodes), max(len(ep["actions"]) for ep in episodes)
    grid = "cells" in episodes[0]
    mask = np.zeros((B, T), dtype=bool)                     # (B, T)      real (not padded) steps
    subgoals = np.full((B, T), -1, dtype=np.int64)          # (B, T)      g_t
    if grid:
        obs = np.zeros((B, T, 13), dtype=np.int64)          # (B, T, 13)  o_1..o_T
        actions = np.full((B, T), -1, dtype=np.int64)       # (B, T)      a_1..a_T
        next_obs = np.full((B, T), -1, dtype=np.int64)      # (B, T)      agent cell in o_{t+1}
        nextcol = np.full((B, T), -1, dtype=np.int64)       # (B, T)      colour the expert heads to
        optimal = np.zeros((B, T, 4), dtype=bool)           # (B, T, 4)
    else:
        obs = np.zeros((B, T, episodes[0]["obs"].shape[1]), dtype=np.float32)    # (B, T, 41) o_1..o_T
        actions = np.zeros((B, T, 8), dtype=np.float32)                          # (B, T, 8)  a_1..a_T
        next_obs = np.zeros_like(obs)                                            # (B, T, 41) o_2..o_{T+1}
    # Input at step t is o_t; targets at step t are a_t and o_{t+1}. Padded steps keep obs = 0 (for the
    # grid a valid index, so the embedding works) and are left out of every loss by the mask.
    for i, ep in enumerate(episodes):
        n = len(ep["actions"])
        mask[i, :n] = True
        subgoals[i, :n] = ep["subgoals"]
        actions[i, :n] = ep["actions"]
        if grid:
            obs[i, :n] = ep["cells"][:n]
            next_obs[i, :n] = ep["cells"][1:n + 1, -1]
            nextcol[i, :n] = ep["next_colour"]
            optimal[i, :n] = ep["optimal"]
        else:
            obs[i, :n] = ep["obs"][:n]
            next_obs[i, :n] = ep["obs"][1:n + 1]
    t = lambda x: torch.from_numpy(x).to(device)
    b = {"obs": t(obs), "actions": t(actions), "mask": t(mask), "next_obs": t(next_obs), "subgoals": t(subgoals)}
    if grid:
        b.update(next_colour=t(nextcol), optimal=t(optimal))
    return b


def fresh_batches(rng: np.random.Generator, args: Args, device):
    """Endless stream of fresh, length-bucketed pretraining batches from dataset D.

    ``bucket_batches`` batches are generated at once, sorted by episode length and cut into batches, so
    each batch pads to a similar length (most padding disappears); the batch order is then shuffled."""
    while True:
        eps = generate_episodes(rng, args.batch_size * args.bucket_batches, gw.PRETRAIN_TASKS, args.epsilon)
        eps.sort(key=lambda ep: len(ep["actions"]))
        chunks = [eps[i:i + args.batch_size] for i in range(0, len(eps), args.batch_size)]
        for j in rng.permutation(len(chunks)):
            yield collate(chunks[j], device)


def sampled_batches(rng: np.random.Generator, episodes: list, size: int, n_bucket: int, device):
    """Endless length-bucketed batches of episodes drawn (with replacement) from a stored set, e.g. D*."""
    while True:
        idx = sorted(rng.integers(len(episodes), size=size * n_bucket), key=lambda i: len(episodes[i]["actions"]))
        chunks = [idx[i:i + size] for i in range(0, len(idx), size)]
        for j in rng.permutation(len(chunks)):
            yield collate([episodes[i] for i in chunks[j]], device)


def batches_of(episodes: list, size: int, device):
    """Fixed-order, length-sorted batches of a stored set (for evaluation and feature extraction)."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i]["actions"]))
    for i in range(0, len(order), size):
        yield collate([episodes[j] for j in order[i:i + size]], device)


ANT_CHUNK = 20                  # ant episodes per seeded chunk of work


def ant_chunk(job: tuple) -> list:
    """Worker process: ``n`` successful ant expert episodes from one seed (task uniform per episode)."""
    import ant_tasks as at
    seed, n, noise = job
    env, rng, out = at.AntPinpadEnv(), np.random.default_rng(seed), []
    for _ in range(20 * n):
        ep = at.expert_episode(env, rng, at.PRETRAIN_TASKS[int(rng.integers(len(at.PRETRAIN_TASKS)))], noise)
        if ep["success"]:                            # D holds successful trajectories [P C.1.1]
            out.append({"obs": ep["obs"].astype(np.float32), "actions": ep["actions"].astype(np.float32),
                        "subgoals": ep["subgoals"].astype(np.int64)})
            if len(out) == n:
                return out
    raise RuntimeError(f"the ant expert succeeded in only {len(out)} of {20 * n} episodes with --action-noise "
                       f"{noise}; use a smaller --action-noise (0.03 keeps ~0.84 success, 0.1 ~0.31)")


def ant_datasets(args: Args, log) -> dict:
    """The ant's stored sets D (train, held-out) and D* (train, held-out), cached in ``<out>/data.pt``.

    Episodes come in chunks of ANT_CHUNK, each from its own seed, so the data do not depend on --workers."""
    import multiprocessing
    path, fp = os.path.join(args.out, "data.pt"), fingerprint(args, "data")
    ss = np.random.SeedSequence(args.seed).spawn(5)
    sizes = {"train": (args.n_train, args.action_noise), "heldout": (args.n_heldout, args.action_noise),
             "dstar_train": (args.n_dstar, 0.0), "dstar_heldout": (args.n_dstar, 0.0)}
    ck = load_ckpt(path, fp, log, "3 data")
    if ck is None:
        jobs, t0 = [], time.time()
        for k, (name, (n, noise)) in enumerate(sizes.items()):
            for j, child in enumerate(ss[k].spawn(-(-n // ANT_CHUNK))):
                jobs.append((name, (int(child.generate_state(1)[0]), min(ANT_CHUNK, n - ANT_CHUNK * j), noise)))
        sets = {name: [] for name in sizes}
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            try:
                for i, eps in enumerate(pool.imap(ant_chunk, [job for _, job in jobs])):
                    sets[jobs[i][0]] += eps
                    if (i + 1) % max(1, len(jobs) // 10) == 0 or i + 1 == len(jobs):
                        log("3 data", f"ant expert episodes: chunk {i + 1}/{len(jobs)} | {eta(t0, i + 1, len(jobs))}")
            except RuntimeError as e:
                sys.exit(f"internal_rl.py: error: {e}")
        # one tensor per field and set (episodes concatenated), so weights_only loading works
        ck = {"fingerprint": fp, "sets": {name: {
            "obs": torch.from_numpy(np.concatenate([ep["obs"] for ep in eps])),
            "actions": torch.from_numpy(np.concatenate([ep["actions"] for ep in eps])),
            "subgoals": torch.from_numpy(np.concatenate([ep["subgoals"] for ep in eps])),
            "lengths": torch.tensor([len(ep["actions"]) for ep in eps])} for name, eps in sets.items()}}
        save_ckpt(path, ck)
    else:
        log("3 data", f"reusing {path}")
    out = {}
    for name, d in ck["sets"].items():                      # back to a list of episodes (numpy views)
        eps, o, a = [], 0, 0
        for n in d["lengths"].tolist():
            eps.append({"obs": d["obs"][o:o + n + 1].numpy(), "actions": d["actions"][a:a + n].numpy(),
                        "subgoals": d["subgoals"][a:a + n].numpy()})
            o, a = o + n + 1, a + n
        out[name] = eps
    out["train_rng"] = np.random.default_rng(ss[4].spawn(1)[0])                 # batch sampling
    out["eval_seed"] = int(np.random.default_rng(ss[4]).integers(2 ** 31))      # env seeds for rollouts
    return out


def make_datasets(args: Args, log=None) -> dict:
    """The fixed sets: held-out D, and D* (epsilon = 0) split by episode into train / held-out halves.

    Each set has its own random stream (spawned from the seed), so adding or resizing one never shifts
    another, and the fresh pretraining stream never repeats them. (The ant: ant_datasets above.)"""
    if args.task == "ant":
        return ant_datasets(args, log or Logger(args.out))
    ss = np.random.SeedSequence(args.seed).spawn(5)
    rngs = [np.random.default_rng(s) for s in ss]
    return {
        "train_rng": rngs[0],                                                  # fresh pretraining batches
        "heldout": generate_episodes(rngs[1], args.n_heldout, gw.PRETRAIN_TASKS, args.epsilon),
        "dstar_train": generate_episodes(rngs[2], args.n_dstar, gw.PRETRAIN_TASKS, 0.0),
        "dstar_heldout": generate_episodes(rngs[3], args.n_dstar, gw.PRETRAIN_TASKS, 0.0),
        "eval_seed": int(rngs[4].integers(2 ** 31)),                           # env seeds for rollouts
    }


# ---------------------------------------------------------------------------------------------------
# 4. The base model: a causal transformer with an explicit residual stream       [P Sec. 4, App. D.1]
# ---------------------------------------------------------------------------------------------------
# The paper's base model is an ordinary autoregressive sequence model: one token per time step (the
# embedded observation o_t), causal self-attention over the past, and at every step a distribution over
# the action a_t and over the next observation o_{t+1} (Eq. 5). No action tokens enter the input: in
# this env the previous action can be read off o_{t-1}, o_t.
#
# What matters for the rest of the paper is the *residual stream*: every pre-norm block reads the running
# vector e_{t,l-1} and adds its output to it, e_{t,l} = e_{t,l-1} + attn(...) + mlp(...). So the stream
# is a shared workspace that all later blocks read, and a linear edit of it at one depth (section 8) is
# seen by every block above. forward() below keeps that loop in plain sight.
#
#   Symbol      | Shape      | Meaning
#   obs         | (B, T, 13) | observations o_1..o_T in index form (section 3; the ant: (B, T, 41) floats)
#   e_{t,l}     | (B, T, D)  | residual after block l; l = 0 is the input embedding
#   act out     | (B, T, 4)  | logits of p(a_t | o_{1:t}) (the ant: the mean (B, T, 8) of a Gaussian)
#   obs out     | (B, T, 49) | logits of p(agent cell of o_{t+1} | o_{1:t}) (the ant: a prediction of o_{t+1})
#
# Positions: there are no absolute position embeddings. Each attention head adds a learned bias that
# depends only on how many steps back a key lies (bucketed as in T5; Table A16 uses 32 buckets), so
# a model pretrained on ~31-step episodes can run the post-training task's ~63-step episodes without
# meeting an absolute position it never saw. (It still meets *distances* it rarely saw: see below.)
def relative_buckets(n: int, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """T5-style causal bucketing of the distance d = t_query - t_key >= 0 (Table A16: 32 buckets).

    Distances below num_buckets/2 get their own bucket, larger ones share log-spaced buckets up to
    max_distance, and everything beyond shares the last bucket. Attention then depends on *how far back*
    a step is, never on its absolute time. Caveat, measured on the data: pretraining episodes are 31
    steps on average (p99 51), so with max_distance = 128 the buckets of distances ~50-100 are almost
    never trained, and the post-training task's ~63-step episodes do use them. A smaller max_distance
    (e.g. 32) makes all long distances share one well-trained bucket; untested as a default so far."""
    d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0)    # (n, n) query x key
    exact = num_buckets // 2
    log_b = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return torch.where(d < exact, d, log_b.clamp(max=num_buckets - 1))       # (n, n) bucket ids


class RelativeBias(nn.Embedding):
    """A learned attention bias per (distance bucket, head); zero at initialisation (as the paper)."""


class CausalSelfAttention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.n_head, D = args.n_head, args.n_embd
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)
        self.rel_bias = RelativeBias(args.rel_buckets, args.n_head)            # one learned bias per bucket and head
        nn.init.zeros_(self.rel_bias.weight)                                    # start as plain causal attention

    def forward(self, x, buckets, cache=None):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (z.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hs)
        t0 = 0
        if cache is not None:                       # KV cache: append this call's keys/values to the past ones
            if "k" in cache:
                t0 = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)   # (B, H, t0+T, hs)
            cache["k"], cache["v"] = k, v
        S = k.shape[2]
        bias = self.rel_bias(buckets[t0:t0 + T, :S]).permute(2, 0, 1)                  # (H, T, S)
        future = torch.arange(S, device=x.device)[None, :] > torch.arange(t0, t0 + T, device=x.device)[:, None]
        bias = bias.masked_fill(future, float("-inf"))                                 # causal mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                    # (B, H, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))                         # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block [P D.1.1]: e <- e + Attn(LN(e)); e <- e + MLP(LN(e))."""

    def __init__(self, args: Args):
        super().__init__()
        D = args.n_embd
        self.ln_1, self.attn = nn.LayerNorm(D), CausalSelfAttention(args)
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, args.mlp_mult * D), nn.ReLU(), nn.Linear(args.mlp_mult * D, D))

    def forward(self, x, buckets, cache=None):
        x = x + self.attn(self.ln_1(x), buckets, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


ANT_OBS_DIM, ANT_MAX_STEPS = 41, 500          # ant_tasks.OBS_DIM, MAX_STEPS (a test checks they agree)
# Object type of each of the 12 object channels in index form: the 4 walls share type 8, colours are 0..7.
OBJ_TYPE = torch.tensor([8] * gw.N_WALLS + list(range(gw.N_COLOURS)))
N_OFFSETS = (2 * gw.GRID - 1) ** 2          # 13 x 13 possible (row, col) offsets between two cells


class GPT(nn.Module):
    """Causal transformer over one token per time step (the observation) [P Sec. 4, Eq. 5].

    Outputs at step t: the action distribution for a_t and a prediction of o_{t+1}. The residual
    stream is explicit: forward() returns e_{t,l} for l = 0..L, and a controller ``ctrl`` (a function
    x -> U x) can be added at layer ``ctrl_layer``: e_{t,l} <- e_{t,l} + U e_{t,l} (Eq. 1), before blocks
    l+1..L, which are unaware of the intervention. Only the input embedding and the two heads differ
    between the grid (4 discrete actions) and the ant (8 continuous torques, a Gaussian head)."""

    def __init__(self, args: Args):
        super().__init__()
        D, self.n_layer, self.task = args.n_embd, args.n_layer, args.task
        if args.task == "grid":
            # Agent-centred input embedding (a choice the paper leaves open; see the module docstring):
            # token = E_agent[agent cell] + sum over the 12 objects of E_obj[object type, offset from the agent].
            self.agent_emb = nn.Embedding(gw.N_CELLS, D)
            self.obj_emb = nn.Embedding(9 * N_OFFSETS, D)
            self.register_buffer("obj_type", OBJ_TYPE.clone(), persistent=False)
        else:
            self.obs_emb = nn.Linear(ANT_OBS_DIM, D)         # the ant's observation is already a feature vector
        self.blocks = nn.ModuleList([Block(args) for _ in range(args.n_layer)])
        self.ln_f = nn.LayerNorm(D)
        if args.task == "grid":
            self.action_head = nn.Linear(D, 4)                                   # logits of p(a_t | o_{1:t})
            self.obs_head = nn.Linear(D, gw.N_CELLS)                             # p(o_{t+1} | o_{1:t}): agent cell
        else:
            self.action_head = nn.Linear(D, 8)                                   # mean of p(a_t | o_{1:t})
            self.log_std = nn.Parameter(torch.full((8,), math.log(0.3)))        # its std: one per joint, learned
            self.obs_head = nn.Linear(D, ANT_OBS_DIM)                            # o_{t+1}, squared error
        max_steps = gw.MAX_STEPS if args.task == "grid" else ANT_MAX_STEPS
        self.register_buffer("buckets", relative_buckets(max_steps + 1, args.rel_buckets,
                                                                args.rel_max_distance), persistent=False)
        self.apply(self._init)                  # (the relative biases keep their zero init)
        for b in self.blocks:                   # GPT-2: scale residual-branch outputs by depth
            for lin in (b.attn.c_proj, b.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * args.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and not isinstance(m, RelativeBias):
            nn.init.normal_(m.weight, std=0.02)

    def embed(self, obs):
        """obs (B, T, 13) -> e_{t,0} (B, T, D); the ant: a linear map of obs (B, T, 41).

        Example: agent at cell 24 (row 3, col 3), colour 5 at cell 10 (row 1, col 3): offset (-2, 0), so
        colour 5 contributes E_obj[5, (-2 + 6) * 13 + (0 + 6)]. The same row serves every agent position,
        which is why "colour 5 is two cells up" is learned once, not 49 times as with a linear map of the
        flat one-hot. The grid's edges are not objects; E_agent[agent cell] tells where they are."""
        if self.task == "ant":
            return self.obs_emb(obs)                                             # (B, T, D)
        agent = obs[..., -1]                                                     # (B, T)
        obj = obs[..., :-1]                                                      # (B, T, 12)
        dr = obj // gw.GRID - (agent // gw.GRID)[..., None] + gw.GRID - 1        # (B, T, 12) row offset in 0..12
        dc = obj % gw.GRID - (agent % gw.GRID)[..., None] + gw.GRID - 1          # (B, T, 12) col offset in 0..12
        idx = self.obj_type * N_OFFSETS + dr * (2 * gw.GRID - 1) + dc            # (B, T, 12)
        return self.agent_emb(agent) + self.obj_emb(idx).sum(-2)                 # (B, T, D)

    def forward(self, obs, ctrl=None, ctrl_layer: int = -1, cache=None):
        """obs (B, T, 13) -> action logits (B, T, 4), next-cell logits (B, T, 49), residuals [L+1 x (B, T, D)].
        (The ant: obs (B, T, 41) -> action means (B, T, 8), next-observation predictions (B, T, 41), residuals.)

        ``cache``: a list with one dict per block (``new_cache()``); the call then continues the sequence
        it holds (rollouts feed one step at a time). ``residuals[l]`` is e_{t,l} as block l wrote it, before any
        controller at layer l; above a controlled layer the residuals carry the controller's effect."""
        x = self.embed(obs)                                                      # e_{t,0}   (B, T, D)
        residuals = [x]
        if ctrl is not None and ctrl_layer == 0:
            x = x + ctrl(x)                                                      # ALGO LOGIC: Eq. 1 at l = 0
        for l, block in enumerate(self.blocks, start=1):
            x = block(x, self.buckets, None if cache is None else cache[l - 1])  # e_{t,l}   (B, T, D)
            residuals.append(x)
            if ctrl is not None and l == ctrl_layer:
                x = x + ctrl(x)                                                  # ALGO LOGIC: Eq. 1: e <- e + U e
        h = self.ln_f(x)
        return self.action_head(h), self.obs_head(h), residuals

    def new_cache(self) -> list:
        return [dict() for _ in self.blocks]

    # What an action is differs by task; these four methods are the only place that knows.
    def action_nll(self, act_out, actions, mask):
        """Mean -ln p(a_t | o_{1:t}) over real steps: cross-entropy (grid) or Gaussian NLL summed over joints (ant)."""
        if self.task == "grid":
            return F.cross_entropy(act_out[mask], actions[mask])
        return -self.action_logp(act_out, actions)[mask].mean()

    def action_logp(self, act_out, actions):
        """ln p(a_t | o_{1:t}) per step (B, T)."""
        if self.task == "grid":
            return F.log_softmax(act_out, -1).gather(-1, actions.clamp(min=0)[..., None])[..., 0]
        z = (actions - act_out) / self.log_std.exp()                             # (B, T, 8)
        return (-0.5 * z ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, act_out, greedy: bool, gen):
        """Actions from the outputs of one step (n, 4) or (n, 8): sampled, or the mode (argmax / mean)."""
        if self.task == "grid":
            if greedy:
                return act_out.argmax(-1)
            return torch.multinomial(F.softmax(act_out, -1), 1, generator=gen)[:, 0]  # (n,)
        if greedy:
            return act_out
        noise = torch.randn(act_out.shape, generator=gen, device=act_out.device)
        return act_out + self.log_std.exp() * noise                              # (n, 8)

    def obs_loss(self, obs_out, b):
        """The next-observation term of Eq. 5: cross-entropy of the agent's next cell (grid), squared error (ant)."""
        if self.task == "grid":
            return masked_ce(obs_out, b["next_obs"])
        return ((obs_out - b["next_obs"]) ** 2).mean(-1)[b["mask"]].mean()

    # The same computation as forward(), cut in two at layer l (Alg. 1-2 call them lower_blocks and
    # upper_blocks). The metacontroller reads e_{t,l} = lower(o_{1:t}) and writes e + U e into upper();
    # since a controller at layer l never changes e_{t,l} itself, lower() can run once without gradients.
    def lower(self, obs, layer: int, cache=None):
        """obs (B, T, 13) -> e_{t,layer} (B, T, D): the embedding and blocks 1..layer."""
        x = self.embed(obs)                                                      # e_{t,0}   (B, T, D)
        for l in range(layer):
            x = self.blocks[l](x, self.buckets, None if cache is None else cache[l])
        return x                                                                 # e_{t,layer} (B, T, D)

    def upper(self, x, layer: int, cache=None):
        """A (possibly controlled) residual at ``layer`` (B, T, D) -> action logits (B, T, 4): blocks layer+1..L."""
        for l in range(layer, self.n_layer):
            x = self.blocks[l](x, self.buckets, None if cache is None else cache[l])
        return self.action_head(self.ln_f(x))                                    # (B, T, 4)


def masked_ce(logits, target):
    """Mean cross-entropy over non-padded steps (target -1 = padding)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1)


# ---------------------------------------------------------------------------------------------------
# 5. Rollouts: the frozen model (optionally controlled) acting in the env, with a KV cache
# ---------------------------------------------------------------------------------------------------
# Every evaluation in the paper rolls the model out in the env: at step t the model sees o_{1:t} (the
# whole history, exactly as in pretraining), its action head gives p(a_t | o_{1:t}), an action is
# sampled, and the env returns o_{t+1}. Re-running the whole prefix at every step would cost O(T^2)
# forwards per episode; instead each attention layer keeps the keys and values of the past steps (a KV
# cache) and each step only computes the new token. A test checks that stepping with the cache gives
# exactly the logits of one full forward. We run n envs side by side, one batched forward per step.
@torch.no_grad()
def rollout(model: GPT, task, n: int, seed: int, device, ctrl_fn=None, ctrl_layer: int = -1,
            greedy: bool = False, pretrain_tasks: bool = False, record: bool = False) -> dict:
    """Run n episodes in lock-step, one batched forward per env step (KV cache: no recomputed prefix).

    ``ctrl_fn(x, g)``, if given, is the controller applied at ``ctrl_layer`` given each episode's current
    ground-truth subgoal g (B, 1) (section 8). Episode i uses env seed ``seed + i`` and, with
    ``pretrain_tasks``, the pretraining task i mod 16 (so every task is evaluated equally often).
    Returns the success rate, the fraction that failed (grid: stepped on a wrong colour; the ant also
    fails by entering the wall cell, leaving the arena or falling; the rest of the failures are
    time-outs), the mean number of task colours visited and the mean episode length. With ``record``
    it also returns the episodes themselves, for RL (section 9): ``obs`` (n, T, 13) the observations
    o_1..o_T the model saw, ``actions`` (n, T), ``lengths`` (n,) and ``rewards`` (n,) (1 = success)."""
    # One env per episode, stepped in lock-step. We use the env classes directly (not gymnasium's vector
    # envs), so there is no autoreset: a finished episode simply stops being stepped.
    E = env_module(model.task)
    envs = [E.GridPinpadEnv() if model.task == "grid" else E.AntPinpadEnv() for _ in range(n)]
    infos, inputs = [], []
    for i, env in enumerate(envs):
        t = E.PRETRAIN_TASKS[i % len(E.PRETRAIN_TASKS)] if pretrain_tasks else task
        obs, info = env.reset(seed=seed + i, options={"task": t})
        infos.append(info)
        inputs.append(env.cells() if model.task == "grid" else obs)   # the model's input form of o_1
    # Evaluation has its own random generator, so evaluating never shifts any training randomness.
    gen = torch.Generator(device=device).manual_seed(seed)
    cache, alive = model.new_cache(), np.ones(n, dtype=bool)
    steps = np.zeros(n, dtype=np.int64)
    seen, taken = [], []                                                                # for ``record``
    for _ in range(E.MAX_STEPS):
        x = torch.tensor(np.array(inputs), device=device)[:, None]                     # (n, 1, 13)
        g = torch.tensor([info["subgoal"] for info in infos], device=device)[:, None]   # (n, 1)
        # the controller is chosen by the env's *current* ground-truth subgoal (analysis only: an agent
        # that must discover its subgoals, the metacontroller, comes in the next sections)
        ctrl = None if ctrl_fn is None else (lambda e: ctrl_fn(e, g))
        act_out, _, _ = model(x, ctrl, ctrl_layer, cache)                               # (n, 1, 4)
        acts = model.sample(act_out[:, 0], greedy, gen)                                 # (n,)
        if record:
            seen.append(x[:, 0])
            taken.append(acts)
        acts = acts.tolist() if model.task == "grid" else acts.cpu().numpy()
        for i, env in enumerate(envs):
            if alive[i]:                 # finished episodes keep feeding their last observation (ignored)
                obs, _, term, trunc, infos[i] = env.step(acts[i])
                inputs[i] = env.cells() if model.task == "grid" else obs
                steps[i] += 1
                alive[i] = not (term or trunc)
        if not alive.any():
            break
    out = {"success": float(np.mean([env.success for env in envs])),
           "wrong_colour": float(np.mean([env.failed for env in envs])),         # the rest timed out
           "colours": float(np.mean([env.progress for env in envs])), "length": float(steps.mean())}
    if record:
        out.update(obs=torch.stack(seen, 1), actions=torch.stack(taken, 1),                # (n, T, 13), (n, T)
                   lengths=torch.tensor(steps, device=device),                             # (n,)
                   rewards=torch.tensor([float(env.success) for env in envs], device=device))  # (n,)
        if model.task == "grid":     # the first colour each episode stepped on (-1: none), for section 11
            out["first_colour"] = [env.task[0] if env.progress else (int(env.kind[env.agent]) if env.failed else -1)
                                   for env in envs]
    return out


# ---------------------------------------------------------------------------------------------------
# 6. Stage "pretrain": next-action prediction                                   [P Eq. 5, App. C.1]
# ---------------------------------------------------------------------------------------------------
# L(theta) = sum_t [ -ln p(a_t | o_{1:t}) - lambda ln p(o_{t+1} | o_{1:t}) ]                    (Eq. 5)
#
# Nothing here mentions subgoals: the data are expert trajectories on the 16 pretraining tasks, with no
# task label and no reward. To predict the expert's next move well, though, the model has to work out
# in context which colour the expert is heading for, and that depends on which colours it visited
# before (the pair rule: after colour 2k comes 2k+1; which pair comes next depends on the task). The
# paper's claim is that this latent "current subgoal" then sits linearly in the mid-depth residual stream
# (section 7) and can be steered (section 8).
#
# On a CPU the question is how fast that happens. Two diagnostics are logged along the way (PAPER.md 13):
# optimal-action accuracy on steps whose target is fixed by the pair rule vs. steps whose target is still
# ambiguous (equal values = only local heuristics learned), and a quick probe at layer 0 vs. layer L/2
# (always compare to layer 0: the agent-centred input already gives layer 0 above-chance accuracy,
# because the agent is usually near its target).
@torch.no_grad()
def action_metrics(model: GPT, episodes: list, device) -> dict:
    """Held-out action NLL and accuracy, plus the pair-rule diagnostic of PAPER.md 13.

    ``opt_acc_ambiguous``: argmax is an optimal expert action on steps heading to the *first* colour of a
    pair (which pair comes next is at best partly known from the history); ``opt_acc_pair``: on steps
    heading to the *second* colour (fully determined by the colour just visited). A model that tracks
    the task has pair >> ambiguous; a model of local heuristics has them equal.

    The ant: held-out NLL and the mean squared error of the mean action (``mse``), per joint."""
    model.eval()
    if model.task == "ant":
        nll, se, n = 0.0, 0.0, 0
        for b in batches_of(episodes, 32, device):
            mean, _, _ = model(b["obs"])
            m = b["mask"]
            nll -= model.action_logp(mean, b["actions"])[m].sum().item()
            se += ((mean - b["actions"]) ** 2).mean(-1)[m].sum().item()
            n += int(m.sum())
        model.train()
        return {"nll": nll / n, "mse": se / n}
    nll, n, acc, hit = 0.0, 0, 0, {0: [0, 0], 1: [0, 0]}
    for b in batches_of(episodes, 256, device):
        logits, _, _ = model(b["obs"])
        m = b["actions"] >= 0
        nll += F.cross_entropy(logits[m], b["actions"][m], reduction="sum").item()
        n += int(m.sum())
        pred = logits.argmax(-1)
        acc += int((pred == b["actions"])[m].sum())
        opt = b["optimal"].gather(-1, pred[..., None])[..., 0]                       # (B, T) argmax optimal?
        for parity in (0, 1):
            mm = m & (b["next_colour"] % 2 == parity)
            hit[parity][0] += int(opt[mm].sum())
            hit[parity][1] += int(mm.sum())
    model.train()
    return {"nll": nll / n, "acc": acc / n, "opt_acc_ambiguous": hit[0][0] / max(hit[0][1], 1),
            "opt_acc_pair": hit[1][0] / max(hit[1][1], 1)}


def lr_factor(step: int, args: Args) -> float:
    """Linear warm-up, constant (as Table A4), then an optional linear cool-down to 0 at the last step."""
    cool = args.cooldown * args.pretrain_steps
    left = (args.pretrain_steps - step) / cool if cool > 0 else 1.0
    return min(1.0, (step + 1) / max(args.warmup, 1), left)


def pretrain(args: Args, data: dict, device, log: Logger):
    """Train the base model from scratch on fresh expert batches. Returns (model, metrics)."""
    path = os.path.join(args.out, "pretrain.pt")
    fp = fingerprint(args, "pretrain")
    torch.manual_seed(args.seed)
    model = GPT(args).to(device)
    ck = load_ckpt(path, fp, log, "6 pretrain")
    if ck is not None and ck["finished"]:
        load_weights(model, ck, path)
        log("6 pretrain", f"reusing {path} (trained {ck['metrics']['steps']} steps in {ck['metrics']['train_time_s']:.0f}s)")
        return model, ck["metrics"]
    # weight decay on every weight except the ant's log std (decay would pull it towards std 1)
    decay = [p for name, p in model.named_parameters() if name != "log_std"]
    groups = [{"params": decay}] + ([{"params": [model.log_std], "weight_decay": 0.0}] if args.task == "ant" else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    rng, step, spent, curve = data["train_rng"], 0, 0.0, []
    # An interrupted run resumes model, optimiser and data stream from the last evaluation. (The data
    # stream restarts at a fresh length bucket, so a resumed run is close to, not bit-identical with, an
    # uninterrupted one.)
    if ck is not None:
        load_weights(model, ck, path)
        opt.load_state_dict(ck["optim"])
        rng.bit_generator.state = json.loads(ck["rng"])
        step, spent, curve = ck["step"], ck["spent"], json.loads(ck["curve"])
        log("6 pretrain", f"resuming {path} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    if args.task == "grid":
        log("6 pretrain", f"{n_params / 1e6:.2f}M parameters, {args.pretrain_steps} steps of {args.batch_size} fresh episodes")
        stream = fresh_batches(rng, args, device)
    else:                   # the ant: batches sampled from the stored set D
        log("6 pretrain", f"{n_params / 1e6:.2f}M parameters, {args.pretrain_steps} steps of {args.batch_size} episodes "
            f"sampled from {len(data['train'])} stored ones")
        stream = sampled_batches(rng, data["train"], args.batch_size, args.bucket_batches, device)
    # t0 is shifted by the time already spent (a resumed run) and by evaluation pauses, so the logged
    # ETA and train_time_s count training only.
    t0, tokens, t_log = time.time() - spent, 0, time.time()
    while step < args.pretrain_steps:
        b = next(stream)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args)
        act_out, obs_out, _ = model(b["obs"])
        # ALGO LOGIC: Eq. 5: -ln p(a_t | o_{1:t}) - lambda ln p(o_{t+1} | o_{1:t})
        loss_a = model.action_nll(act_out, b["actions"], b["mask"])
        loss_o = model.obs_loss(obs_out, b)
        loss = loss_a + args.obs_coef * loss_o
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)   # rare spikes early in training
        opt.step()
        step += 1
        tokens += int(b["mask"].sum())
        if step % args.log_every == 0 or step == args.pretrain_steps:
            tps = tokens / (time.time() - t_log)
            log("6 pretrain", f"step {step}/{args.pretrain_steps} | loss {loss_a.item():.3f} | obs {loss_o.item():.3f} "
                f"| {tps / 1e3:.1f}k tok/s | {eta(t0, step, args.pretrain_steps)}", step=step, loss=loss_a.item())
            tokens, t_log = 0, time.time()
        if step % args.eval_every == 0 or step == args.pretrain_steps:
            te = time.time()
            m = action_metrics(model, data["heldout"], device)
            pr = probe_all(model, data["dstar_heldout"][:args.quick_probe_episodes], [0, args.n_layer // 2], device,
                           steps=args.quick_probe_steps, lr=args.probe_lr)
            curve.append({"step": step, "minutes": (time.time() - t0) / 60, **m, "probe_l0": pr[0], "probe_mid": pr[1]})
            fit = (f"acc {m['acc']:.3f} | optimal-action acc ambiguous {m['opt_acc_ambiguous']:.3f} / pair-determined "
                   f"{m['opt_acc_pair']:.3f}" if args.task == "grid" else f"mean-action squared error {m['mse']:.4f}")
            log("6 pretrain", f"eval step {step} | nll {m['nll']:.3f} | {fit} | probe layer 0 {pr[0]:.3f} -> layer "
                f"{args.n_layer // 2} {pr[1]:.3f} ({time.time() - te:.0f}s)", **curve[-1])
            t0 += time.time() - te          # evaluation time does not count as training time
            save_ckpt(path, {"fingerprint": fp, "finished": False, "model": model.state_dict(),
                             "optim": opt.state_dict(), "rng": json.dumps(rng.bit_generator.state), "step": step,
                             "spent": time.time() - t0, "curve": json.dumps(curve)})
    m = action_metrics(model, data["heldout"], device)
    metrics = {"steps": step, "episodes": step * args.batch_size, "heldout_nll": m["nll"],
               **({"heldout_acc": m["acc"], "opt_acc_ambiguous": m["opt_acc_ambiguous"], "opt_acc_pair": m["opt_acc_pair"]}
                  if args.task == "grid" else {"heldout_mse": m["mse"]}),
               "train_time_s": time.time() - t0, "n_params": n_params, "curve": curve}
    save_ckpt(path, {"fingerprint": fp, "finished": True, "model": model.state_dict(), "metrics": metrics})
    return model, metrics


# ---------------------------------------------------------------------------------------------------
# 7. Stage "probe": linear probes of the current subgoal                 [P Sec. 5.1, Eq. 6-7, Fig. 3/A1]
# ---------------------------------------------------------------------------------------------------
# Is the current subgoal g_t (which colour pair the expert is working on) *linearly* readable from the
# residual e_{t,l}? For each layer l we fit p(g_t = g | e_{t,l}) = softmax(W_l e_{t,l} + b_l)_g (Eq. 6-7)
# on the frozen model's residuals of held-out D* episodes and score it on other episodes (split by
# episode: steps of one episode are strongly correlated, so a split by step would leak). The paper sees
# accuracy rise from ~0.3 at the input to ~0.5 around mid-depth (Fig. A1). The probe is the subgoal's
# identity (0..3), not its index within the task (a bug in one public re-implementation).
@torch.no_grad()
def residual_features(model: GPT, episodes: list, device) -> tuple:
    """Residuals of every real step at every layer: ([L+1 x (N, D)], subgoal labels (N,), episode id (N,))."""
    model.eval()
    feats, labels = [[] for _ in range(model.n_layer + 1)], []
    for b in batches_of(episodes, 256, device):
        _, _, res = model(b["obs"])
        m = b["subgoals"] >= 0
        for l, e in enumerate(res):
            feats[l].append(e[m])                                               # (n_real, D)
        labels.append(b["subgoals"][m])
    model.train()
    return [torch.cat(f) for f in feats], torch.cat(labels)


def train_probe(x_tr, y_tr, x_te, y_te, steps: int, lr: float) -> float:
    """Softmax probe p(g | e) = softmax(W e + b) (Eq. 6-7), full-batch AdamW; returns held-out accuracy."""
    # Residual norms differ a lot between layers; standardising each feature (with train statistics only)
    # lets one learning rate fit every layer. A linear map of standardised features is still linear in e.
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-5                                  # standardise (train stats)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    probe = nn.Linear(x_tr.shape[1], gw.N_SUBGOALS).to(x_tr.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x_tr), y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((probe(x_te).argmax(-1) == y_te).float().mean())


def probe_all(model: GPT, episodes: list, layers: list, device, steps: int, lr: float) -> list:
    """Held-out probe accuracy at each layer; episodes split in halves (by episode, never by step)."""
    half = len(episodes) // 2
    f_tr, y_tr = residual_features(model, episodes[:half], device)
    f_te, y_te = residual_features(model, episodes[half:], device)
    with torch.random.fork_rng():          # probes must not shift the caller's random stream
        torch.manual_seed(0)
        return [train_probe(f_tr[l], y_tr, f_te[l], y_te, steps, lr) for l in layers]


def probe_stage(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    path = os.path.join(args.out, "probe.pt")
    fp = fingerprint(args, "probe")
    ck = load_ckpt(path, fp, log, "7 probe")
    if ck is not None:
        log("7 probe", f"reusing {path}")
        return ck["metrics"]
    t0 = time.time()
    acc = probe_all(model, data["dstar_heldout"][:args.n_probe], list(range(args.n_layer + 1)), device, args.probe_steps, args.probe_lr)
    for l, a in enumerate(acc):
        log("7 probe", f"layer {l}: held-out subgoal accuracy {a:.3f} (chance 0.25)")
    mid = args.n_layer // 2
    log("7 probe", f"gap layer {mid} - layer 0 = {acc[mid] - acc[0]:+.3f} ({time.time() - t0:.0f}s)")
    metrics = {"probe_accuracy": acc, "probe_gap_mid": acc[mid] - acc[0], "train_time_s": time.time() - t0}
    save_ckpt(path, {"fingerprint": fp, "metrics": metrics})
    return metrics


# ---------------------------------------------------------------------------------------------------
# 8. Stage "controllers": ground-truth residual-stream controllers        [P Eq. 1, Sec. 5.2, Fig. 4, Table A7]
# ---------------------------------------------------------------------------------------------------
# Probing says the information is there; control asks whether the model *uses* it. Eq. 1 inserts a
# linear controller into the residual stream at layer l:
#
#     e_{t,l} <- e_{t,l} + U_t e_{t,l}                                                           (Eq. 1)
#
# and blocks l+1..L process the edited stream as if nothing happened. LoRA-style, U is low-rank:
# One linear controller per subgoal g, U^(g) = A_g B_g^T with A_g, B_g in R^{D x r} (rank <= r = 16).
# During training and evaluation the ground-truth subgoal g_t picks U_t = U^(g_t), and the frozen model
# runs with e_{t,l} <- e_{t,l} + U_t e_{t,l} at one layer l. If the residual stream encodes the subgoal
# linearly, such a U can *steer* the model toward it, and switching controllers in the right order
# should solve subgoal orders never seen in pretraining (the post-training task).
#
#   Symbol  | Shape        | Meaning
#   A, B    | (K, D, r)    | factors of the K = 4 controllers (only these train; the base is frozen)
#   g       | (B, T)       | ground-truth subgoal id per step (from the env's info / the dataset)
#   U^(g)   | (D, D)       | A_g B_g^T, never formed during training (apply_controller works on factors)
#
# Training minimises -sum_t ln p(a_t | o_{1:t}, g_t) on D* (Table A7). Evaluation switches controllers by
# the env's ground-truth subgoal, samples actions and counts successes: on the pretraining tasks (does the
# controller steer at all?) and on the post-training task 0-1-2-3-4-5-6-7-0-1-2-3 (does steering compose
# into subgoal orders the model never saw?). The paper finds mid-depth (L/2) works best (Fig. 4).

def apply_controller(x, A, Bm):
    """U x with U = A B^T, without forming U: x (..., D), A and Bm (..., D, r) -> (..., D)."""
    coef = torch.einsum("...d,...dr->...r", x, Bm)                               # B^T x    (..., r)
    return torch.einsum("...dr,...r->...d", A, coef)                             # A B^T x  (..., D)


class SubgoalControllers(nn.Module):
    """K low-rank controllers, selected per step by the subgoal id g (B, T).

    A starts at 0 (so U = 0, the exact identity, at initialisation, as in LoRA); B starts random."""

    def __init__(self, K: int, D: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(K, D, rank))                           # (K, D, r)
        self.B = nn.Parameter(torch.randn(K, D, rank) / math.sqrt(D))            # (K, D, r)

    def forward(self, x, g):
        """x (B, T, D), g (B, T) -> U^(g_t) x_t (B, T, D).

        Same as ``apply_controller(x, self.A[g], self.B[g])``, but without copying a (D, r) pair of factors
        for every step: apply all K controllers' B^T, keep the selected one, then apply A."""
        onehot = F.one_hot(g, self.A.shape[0]).to(x.dtype)                       # (B, T, K)
        coef = torch.einsum("btd,kdr->btkr", x, self.B) * onehot[..., None]      # B_g^T x   (B, T, K, r)
        return torch.einsum("btkr,kdr->btd", coef, self.A)                       # ALGO LOGIC: U_t x = A_g B_g^T x

    def U(self, k: int):
        return self.A[k] @ self.B[k].T                                           # (D, D), rank <= r


def train_controllers(args: Args, model: GPT, layer: int, episodes: list, device, log: Logger) -> SubgoalControllers:
    """Minimise sum_t -ln p(a_t | o_{1:t}, g_t) on D* with the base model frozen (only A, B train)."""
    model.requires_grad_(False).eval()       # the base model is frozen: gradients reach only A and B
    K = env_module(args.task).N_SUBGOALS
    ctrl = SubgoalControllers(K, args.n_embd, args.ctrl_rank or args.n_embd).to(device)           # rank 0: full
    opt = torch.optim.AdamW(ctrl.parameters(), lr=args.ctrl_lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed + 100 + layer)
    t0 = time.time()
    for step in range(1, args.ctrl_steps + 1):
        idx = rng.integers(len(episodes), size=args.ctrl_batch)
        b = collate([episodes[i] for i in idx], device)
        g = b["subgoals"].clamp(min=0)                                           # padding -> any id (masked)
        act_out, _, _ = model(b["obs"], lambda x: ctrl(x, g), layer)
        loss = model.action_nll(act_out, b["actions"], b["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.ctrl_steps:
            log("8 controllers", f"layer {layer} step {step}/{args.ctrl_steps} | nll {loss.item():.3f} | "
                f"{eta(t0, step, args.ctrl_steps)}", layer=layer, step=step, nll=loss.item())
    return ctrl


@torch.no_grad()
def controlled_nll(model: GPT, ctrl, layer: int, episodes: list, device) -> float:
    total, n = 0.0, 0
    for b in batches_of(episodes, 256, device):
        g = b["subgoals"].clamp(min=0)
        act_out, _, _ = model(b["obs"], None if ctrl is None else (lambda x: ctrl(x, g)), layer)
        m = b["mask"]
        total -= model.action_logp(act_out, b["actions"])[m].sum().item()
        n += int(m.sum())
    return total / n


def controller_stage(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """Train and evaluate ground-truth controllers at each layer in --ctrl-layers (Fig. 4's x-axis).

    The base model alone is evaluated on the same episodes: on pretraining tasks it can only guess the
    task (a perfect pair rule with no task knowledge succeeds ~1/16 of the time), on the post-training
    task it essentially never succeeds. Controllers that steer should lift the first well above that."""
    path = os.path.join(args.out, "controllers.pt")
    fp = fingerprint(args, "controllers")
    ck = load_ckpt(path, fp, log, "8 controllers")
    if ck is not None:
        log("8 controllers", f"reusing {path}")
        return ck["metrics"]
    t0, seed = time.time(), data["eval_seed"]
    ev = dict(n=args.n_eval, device=device, greedy=args.greedy)
    base_pre = rollout(model, None, seed=seed, pretrain_tasks=True, **ev)
    post_task = env_module(args.task).POSTTRAIN_TASK
    base_post = rollout(model, post_task, seed=seed + 10 ** 6, **ev)
    log("8 controllers", f"base model alone: success pretraining tasks {base_pre['success']:.3f}, "
        f"post-training task {base_post['success']:.3f} ({base_post['colours']:.1f} of {len(post_task)} colours)")
    layers = ctrl_layers(args)
    per_layer, states = {}, {}
    for layer in layers:
        ctrl = train_controllers(args, model, layer, data["dstar_train"], device, log)
        nll = controlled_nll(model, ctrl, layer, data["dstar_heldout"][:args.n_probe // 2], device)
        fn = lambda x, g, c=ctrl: c(x, g)
        pre = rollout(model, None, seed=seed, pretrain_tasks=True, ctrl_fn=fn, ctrl_layer=layer, **ev)
        post = rollout(model, post_task, seed=seed + 10 ** 6, ctrl_fn=fn, ctrl_layer=layer, **ev)
        per_layer[layer] = {"nll": nll, "pretrain": pre, "posttrain": post}
        if layer == args.n_layer // 2 and not args.greedy:      # diagnostic: the same controllers, argmax actions
            ev_g = {**ev, "greedy": True}
            per_layer[layer]["pretrain_greedy"] = rollout(model, None, seed=seed, pretrain_tasks=True, ctrl_fn=fn,
                                                          ctrl_layer=layer, **ev_g)["success"]
            per_layer[layer]["posttrain_greedy"] = rollout(model, post_task, seed=seed + 10 ** 6, ctrl_fn=fn,
                                                           ctrl_layer=layer, **ev_g)["success"]
            log("8 controllers", f"layer {layer}, argmax actions instead of sampling (diagnostic): pretraining tasks "
                f"{per_layer[layer]['pretrain_greedy']:.3f} | post-training task {per_layer[layer]['posttrain_greedy']:.3f}")
        states[str(layer)] = ctrl.state_dict()
        log("8 controllers", f"layer {layer}: held-out D* nll {nll:.3f} | success pretraining tasks "
            f"{pre['success']:.3f} (failed {pre['wrong_colour']:.2f}) | post-training task {post['success']:.3f} "
            f"({post['colours']:.1f} of {len(post_task)} colours, failed {post['wrong_colour']:.2f}) "
            f"| {eta(t0, layers.index(layer) + 1, len(layers))}", layer=layer, **{k: v['success'] for k, v in
                                                                                  (('pretrain', pre), ('posttrain', post))})
    L1 = args.n_layer + 1
    metrics = {
        "base_success": base_post["success"], "base_success_pretrain": base_pre["success"],
        "base_nll": controlled_nll(model, None, -1, data["dstar_heldout"][:args.n_probe // 2], device),
        "controller_success": [per_layer[l]["posttrain"]["success"] if l in per_layer else None for l in range(L1)],
        "controller_success_pretrain": [per_layer[l]["pretrain"]["success"] if l in per_layer else None for l in range(L1)],
        "controller_colours": [per_layer[l]["posttrain"]["colours"] if l in per_layer else None for l in range(L1)],
        "controller_nll": [per_layer[l]["nll"] if l in per_layer else None for l in range(L1)],
        "controller_rollouts": {str(l): v for l, v in per_layer.items()},
        "base_rollouts": {"pretrain": base_pre, "posttrain": base_post},
        "eval_episodes": args.n_eval, "eval_greedy": args.greedy, "train_time_s": time.time() - t0,
    }
    save_ckpt(path, {"fingerprint": fp, "metrics": metrics, "controllers": states})
    return metrics


# ---------------------------------------------------------------------------------------------------
# 9. The RL toolkit and token-level RL                                    [P Sec. 8.3-8.4, App. C.5.2]
# ---------------------------------------------------------------------------------------------------
# The post-training task (0-1-2-3-4-5-6-7-0-1-2-3) pays a single reward of 1 when all 12 colours are
# visited in order, else 0. Its subgoal order A-B-C-D-A-B uses only transitions that never occur in
# pretraining, and its episodes are twice as long. Both RL methods of the paper use the same update
# (App. C.5.2): a PPO-style clipped ratio with no critic, and one advantage per *trajectory*,
#
#     A_tau = (R(tau) - mean_B R) / (std_B R + 1e-3)                     (population std over the batch)
#     L = -E_tau [ sum_t min( rho_t A_tau, clip(rho_t, 1 - eps, 1 + eps) A_tau ) ],
#     rho_t = pi(act_t | s_{1:t}) / pi_old(act_t | s_{1:t}),
#
# like GRPO without groups. What differs between the methods is only *what an action is*:
#   token-level RL: act_t = the primitive move a_t at every env step, pi = the whole base model (finetuned);
#   internal RL:    act_k = the controller code z at the k-th switch only, pi = a small causal policy
#                   over z; the base model and the metacontroller's decoder are part of the environment.
# Section 11 is written as a diff against this section; the lines that differ carry # ALGO LOGIC.
#
#   Symbol   | Shape     | Meaning
#   rewards  | (B,)      | R(tau) in {0, 1}
#   adv      | (B,)      | A_tau, the same for every action of episode tau
#   logp     | (B, T')   | log pi(act | history) of each action (T' = env steps, or switches for internal RL)
#   mask     | (B, T')   | 1 where the action exists (episodes have different lengths / numbers of switches)
#
# Token-level RL starts from the pretrained model, which on this task succeeds essentially never (0 in
# section 8's 500 episodes; PAPER.md 8.4: about once in a million): with no success in a batch every
# advantage is 0 and the update does nothing. That is the paper's point about raw-action exploration.

def trajectory_advantage(rewards):
    """A_tau = (R - mean_B R) / (std_B R + 1e-3) (App. C.5.2): one number per episode (B,)."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-3)       # ALGO LOGIC: (B,)


def ppo_loss(logp, logp_old, adv, mask, clip: float):
    """-mean over all actions in the batch of min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - logp_old).

    logp, logp_old, mask: (B, T') per action; adv: (B,) per episode, broadcast to each of its actions (one
    public re-implementation used adv[0] for every episode; a test checks this against a slow loop)."""
    ratio = torch.exp(logp - logp_old)                                             # (B, T')  rho
    a = adv[:, None]                                                               # (B, 1)   A_tau
    obj = torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)                # ALGO LOGIC: clipped surrogate
    return -(obj * mask).sum() / mask.sum().clamp(min=1)


def step_mask(lengths, T: int):
    """(B,) lengths -> (B, T) float mask of the real steps."""
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).float()


def token_logp(model: GPT, obs, actions):
    """log p(a_t | o_{1:t}) of the taken actions (B, T) under the (trainable) base model."""
    logits, _, _ = model(obs)                                                      # (B, T, 4)
    return F.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]        # (B, T)


def rl_train(args: Args, tag: str, collect, logp_fn, params, lr: float, seed: int, log: Logger) -> dict:
    """The shared RL loop (Alg. 3): collect B episodes with the current policy, one advantage per episode,
    ``rl_epochs`` full-batch steps on the clipped objective; until ``rl_episodes`` episodes are used.

    ``collect(n, seed)`` -> batch dict with ``rewards`` (B,), ``mask`` (B, T') and whatever ``logp_fn``
    needs; ``logp_fn(batch)`` -> (B, T') log-probabilities of the batch's actions under the current policy.
    Returns the learning curve: [episodes so far, success rate of that batch] per batch."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))   # Table A13: wd 0
    curve, episodes, t0 = [], 0, time.time()
    n_batches = math.ceil(args.rl_episodes / args.rl_batch)
    for it in range(1, n_batches + 1):
        batch = collect(args.rl_batch, seed + episodes)          # fresh env seeds for every episode
        episodes += args.rl_batch
        R = batch["rewards"]
        curve.append([episodes, float(R.mean())])
        if R.std() > 0:          # an all-0 (or all-1) batch has every advantage 0: nothing to learn from
            adv = trajectory_advantage(R)                                          # (B,)
            with torch.no_grad():
                logp_old = logp_fn(batch)                                          # (B, T') pi_old
            for _ in range(args.rl_epochs):
                loss = ppo_loss(logp_fn(batch), logp_old, adv, batch["mask"], args.clip_coef)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                opt.step()
        if it % max(1, n_batches // 12) == 0 or it == n_batches:
            recent = np.mean([c[1] for c in curve[-max(1, n_batches // 12):]])
            log(tag, f"episodes {episodes}/{n_batches * args.rl_batch} | batch success {R.mean():.3f} "
                f"(recent mean {recent:.3f}) | {eta(t0, it, n_batches)}", episodes=episodes, success=float(R.mean()))
    return {"curve": curve, "episodes": episodes, "train_time_s": time.time() - t0}


def token_rl(args: Args, model: GPT, seed: int, device, log: Logger):
    """Token-level RL: finetune a copy of the pretrained base model on primitive actions (PAPER.md 8.4)."""
    policy = copy.deepcopy(model).requires_grad_(True)     # the frozen original stays untouched

    def collect(n, s):
        r = rollout(policy, gw.POSTTRAIN_TASK, n, s, device, record=True)
        return {"rewards": r["rewards"], "obs": r["obs"], "actions": r["actions"],
                "mask": step_mask(r["lengths"], r["actions"].shape[1])}

    logp_fn = lambda b: token_logp(policy, b["obs"], b["actions"])             # ALGO LOGIC: act = a_t, every step
    m = rl_train(args, "9 token_rl", collect, logp_fn, list(policy.parameters()), args.token_lr, seed, log)
    return policy, m


# ---------------------------------------------------------------------------------------------------
# 10. The metacontroller: discovering subgoals and when to switch      [P Sec. 6, Eq. 2-3, App. D.2, Table A9]
# ---------------------------------------------------------------------------------------------------
# Section 8 needed the true subgoal labels. The metacontroller finds controllers *and* their timing
# without labels, self-supervised on D*, reading the frozen model's residual e_t = e_{t,L/2} and writing
# a controller back at the same layer:
#
#   s     = f_emb(e_{1:T})                           non-causal sequence embedding (sees the future) Eq. 13
#   h_t   = GRU(e_t, h_{t-1})                        history                                         Eq. 12
#   mu_t, Sigma_t = f_enc(e_t, h_{t-1}, s);  z~_t ~ N(mu_t, Sigma_t)    proposal for a new code      Eq. 14-15
#   beta_t = f_switch(e_t, h_{t-1}, z_{t-1}) in [0, 1]     causal switching unit (no s: usable at test time) Eq. 16
#   z_t   = beta_t z~_t + (1 - beta_t) z_{t-1}      temporal integration                             Eq. 2
#   U_t   = f_hyp(z_t) = A(z_t) B(z_t)^T            hypernetwork decoder, rank r = 16                Eq. 18
#   e_t  <- e_t + U_t e_t                           then the frozen upper blocks predict a_t        Eq. 11
#
# Loss (Eq. 3 with lambda = 0): sum_t [ -ln p(a_t | o_{1:t}, z_{1:t}) + alpha KL(N(mu_t, Sigma_t) || N(0, I)) ].
# The KL is charged at *every* step, not weighted by beta (App. E.1 shows the relaxed per-step KL is this
# whatever beta is; weighting by beta is a bug one re-implementation shipped). Why switching then comes
# out sparse: when beta_t ~ 0 the proposal z~_t is unused, so the encoder can put it at the prior for
# free; every bit about the future that the decoder gets costs KL only at the steps where beta lets it in.
# One code per subgoal, sent at its start, buys the NLL the subgoal is worth for a few nats per segment.
# Whether that beats the alternatives (sending nothing; sending the expert's coin flips between equally
# short paths, which a non-causal encoder also sees) depends on alpha and on how much the subgoal is worth
# to the base model: a rate-distortion trade-off (Fig. 7). The README measures it on our base models.
#
#   Symbol     | Shape          | Meaning
#   e          | (B, T, D)      | e_{t,L/2} of the frozen model on D* episodes (no controller below L/2)
#   s          | (B, S)         | sequence embedding, S = mc_hidden (32)
#   h          | (B, T, H)      | history GRU states h_1..h_T, H = mc_hidden
#   mu, logvar | (B, T, Z)      | Gaussian proposal, Z = n_z (8)
#   beta       | (B, T)         | switching gate (beta_1 = 1: the first step always picks a code)
#   z          | (B, T, Z)      | integrated code
#   A, Bm      | (B, T, D, r)   | U_t = A Bm^T
#
# The forced-switching ablation (App. C.4.1) trains the same module with beta_t = 1 at every step.

def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) summed over the last axis (the alpha term of Eq. 3)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)                        # ALGO LOGIC: closed form


class MetaController(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        D, Z, H, E, r = args.n_embd, args.n_z, args.mc_hidden, args.mc_enc_hidden, args.ctrl_rank
        self.D, self.r, self.gumbel = D, r, args.mc_gumbel
        # internal sequence embedder (Eq. 13): a bidirectional GRU over the whole sequence, its outputs
        # averaged over the real steps (our choice of pooling; the paper does not say), then linear.
        self.embedder = nn.GRU(D, H, batch_first=True, bidirectional=True)
        self.emb_out = nn.Linear(2 * H, H)
        self.history = nn.GRU(D, H, batch_first=True)                                    # Eq. 12
        self.encoder = nn.Sequential(nn.Linear(D + H + H, E), nn.ReLU(), nn.Linear(E, 2 * Z))  # Eq. 14
        self.switch = nn.Sequential(nn.Linear(D + H + Z, E), nn.ReLU(), nn.Linear(E, 1))       # Eq. 16
        self.decoder = nn.Sequential(nn.Linear(Z, H), nn.ReLU(), nn.Linear(H, 2 * D * r))      # Eq. 18
        # LoRA-style start: the A half of the decoder's output is exactly 0 (U = 0, the identity), the B
        # half is random, so the first gradient step already moves U.
        last = self.decoder[2]
        with torch.no_grad():
            last.weight[:D * r].zero_()
            last.bias[:D * r].zero_()
            last.weight[D * r:].normal_(0, 0.02)
            last.bias[D * r:].normal_(0, 1 / math.sqrt(D))

    def factors(self, z):
        """z (..., Z) -> A, Bm (..., D, r): the low-rank controller U = A Bm^T (Eq. 18)."""
        out = self.decoder(z).unflatten(-1, (2, self.D, self.r))                         # (..., 2, D, r)
        return out[..., 0, :, :], out[..., 1, :, :]

    def apply(self, z, e):
        """U(z_t) e_t at every step, the same numbers as apply_controller(e, *self.factors(z)) (a test checks).

        Forming A(z_t), Bm(z_t) for every step costs a (B, T, 2 D r) tensor and many tiny matmuls; but the
        decoder's last layer is linear in its hidden layer h = relu(W1 z + b1), A[d,i] = sum_j Wa[d,i,j] h_j
        + ba[d,i] (and the same for Bm), so Bm^T e and A (Bm^T e) are two ordinary matmuls (~10x faster)."""
        D, r = self.D, self.r
        h = self.decoder[1](self.decoder[0](z))                                          # (B, T, H)
        W, b = self.decoder[2].weight, self.decoder[2].bias                              # (2 D r, H), (2 D r,)
        Wa, Wb = W.view(2, D * r, -1).unbind(0)                                          # (D r, H) each
        ba, bb = b.view(2, D, r).unbind(0)                                               # (D, r) each
        P = (e @ Wb.view(D, -1)).unflatten(-1, (r, h.shape[-1]))                         # (B, T, r, H)
        coef = (P * h[..., None, :]).sum(-1) + e @ bb                                    # Bm(z)^T e    (B, T, r)
        outer = (coef[..., :, None] * h[..., None, :]).flatten(-2)                       # (B, T, r H)
        return outer @ Wa.view(D, -1).T + coef @ ba.T                                    # A(z) Bm(z)^T e  (B, T, D)

    def switch_prob(self, e, h_prev, z_prev, noisy: bool = False):
        """beta_t = f_switch(e_t, h_{t-1}, z_{t-1}) (Eq. 16): causal, no access to s. (B, D) -> (B,)

        ``noisy`` (training with --mc-gumbel > 0): a Gumbel-sigmoid sample, sigmoid((logit + logistic noise) / tau),
        which makes in-between values of beta noisy and so pushes the gate towards 0 or 1."""
        logit = self.switch(torch.cat([e, h_prev, z_prev], -1))[..., 0]                 # (B,)
        if noisy and self.gumbel > 0:
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = (logit + torch.log(u) - torch.log1p(-u)) / self.gumbel
        return torch.sigmoid(logit)                                                      # ALGO LOGIC: switching gate

    def sequence_embedding(self, e, lengths):
        """s = f_emb(e_{1:T}) (B, S): the non-causal part (every step of the episode, future included)."""
        packed = nn.utils.rnn.pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.embedder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=e.shape[1])  # (B, T, 2H)
        mask = step_mask(lengths, e.shape[1])[..., None]                                  # (B, T, 1)
        return self.emb_out((out * mask).sum(1) / lengths[:, None].float())             # (B, S)

    def forward(self, e, lengths, forced: bool = False, sample: bool = True):
        """e (B, T, D) -> z (B, T, Z), kl (B, T), beta (B, T); U_t = f_hyp(z_t). ``forced``: beta = 1 (ablation)."""
        B, T, _ = e.shape
        s = self.sequence_embedding(e, lengths)                                          # (B, S)
        h, _ = self.history(e)                                                           # (B, T, H) h_1..h_T
        h_prev = torch.cat([h.new_zeros(B, 1, h.shape[-1]), h[:, :-1]], 1)              # (B, T, H) h_{t-1}, h_0 = 0
        stats = self.encoder(torch.cat([e, h_prev, s[:, None].expand(B, T, s.shape[-1])], -1))
        mu, logvar = stats.chunk(2, -1)                                                  # (B, T, Z) each, Eq. 14
        logvar = logvar.clamp(-10, 5)
        z_tilde = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu  # Eq. 15, reparameterised
        kl = gaussian_kl(mu, logvar)                                                     # (B, T) charged at every step
        z, zs, betas = e.new_zeros(B, mu.shape[-1]), [], []
        # the only sequential part: beta_t reads z_{t-1}. (unbind() slices once; indexing [:, t] inside the
        # loop would make autograd build a full-size zero tensor per step, O(T^2).)
        e_t, h_t, zt_t = e.unbind(1), h_prev.unbind(1), z_tilde.unbind(1)
        for t in range(T):
            if t == 0 or forced:
                beta = e.new_ones(B)                                                     # (B,)
            else:
                beta = self.switch_prob(e_t[t], h_t[t], z, noisy=sample)                # (B,)
            z = beta[:, None] * zt_t[t] + (1 - beta[:, None]) * z                      # ALGO LOGIC: Eq. 2 (B, Z)
            zs.append(z)
            betas.append(beta)
        return torch.stack(zs, 1), kl, torch.stack(betas, 1)                            # (B, T, Z), (B, T), (B, T)


def mc_loss(model: GPT, mc: MetaController, b: dict, layer: int, alpha: float, forced: bool = False):
    """Eq. 3 with lambda = 0 on a D* batch: action NLL through the frozen model + alpha * mean per-step KL."""
    with torch.no_grad():
        e = model.lower(b["obs"], layer)                     # (B, T, D) the controller never changes e_{t,l}
    lengths = (b["actions"] >= 0).sum(1)                                                 # (B,)
    z, kl, beta = mc(e, lengths, forced)
    logits = model.upper(e + mc.apply(z, e), layer)                                      # ALGO LOGIC: Eq. 11, (B, T, 4)
    nll = masked_ce(logits, b["actions"])
    mask = step_mask(lengths, e.shape[1])                                                # (B, T)
    kl_mean = (kl * mask).sum() / mask.sum()
    return nll + alpha * kl_mean, nll, kl_mean, beta, mask                              # ALGO LOGIC: Eq. 3


def boundary_f1(beta, subgoals, lengths, tol: int = 1) -> dict:
    """Switches (beta >= 0.5) against ground-truth subgoal changes, per episode, matched within +-tol steps.

    The first step never counts (every episode starts with a code). A predicted switch matches at most one
    true boundary and vice versa (greedy, in time order). Returns precision, recall, F1, switch rate."""
    tp = n_pred = n_true = n_steps = 0
    for bt, g, n in zip(beta.tolist(), subgoals.tolist(), lengths.tolist()):
        pred = [t for t in range(1, n) if bt[t] >= 0.5]
        true = [t for t in range(1, n) if g[t] != g[t - 1]]
        used = set()
        for t in true:
            best = min((p for p in pred if abs(p - t) <= tol and p not in used), key=lambda p: abs(p - t), default=None)
            if best is not None:
                used.add(best)
                tp += 1
        n_pred, n_true, n_steps = n_pred + len(pred), n_true + len(true), n_steps + max(n - 1, 0)
    prec, rec = tp / max(n_pred, 1), tp / max(n_true, 1)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-9),
            "switch_rate": n_pred / max(n_steps, 1)}


@torch.no_grad()
def switch_alignment(model: GPT, mc: MetaController, episodes: list, layer: int, device) -> dict:
    """Held-out switch statistics (posterior means, no sampling), plus NLL, KL and a beta histogram."""
    betas, subgoals, lens, nll, kl, n = [], [], [], 0.0, 0.0, 0
    for b in batches_of(episodes, 256, device):
        e = model.lower(b["obs"], layer)
        lengths = (b["actions"] >= 0).sum(1)
        z, k, beta = mc(e, lengths, sample=False)
        logits = model.upper(e + mc.apply(z, e), layer)
        m = b["actions"] >= 0
        nll += F.cross_entropy(logits[m], b["actions"][m], reduction="sum").item()
        kl += k[m].sum().item()
        n += int(m.sum())
        betas += beta.tolist()
        subgoals += b["subgoals"].tolist()
        lens += lengths.tolist()
    T = max(len(x) for x in betas)
    pad = lambda rows, v: torch.tensor([r + [v] * (T - len(r)) for r in rows])
    beta, g, L = pad(betas, 0.0), pad(subgoals, -1), torch.tensor(lens)
    out = boundary_f1(beta, g, L)
    real = step_mask(L, T).bool() & (torch.arange(T)[None] > 0)
    out.update(nll=nll / n, kl=kl / n, beta_hist=torch.histc(beta[real], bins=10, min=0, max=1).int().tolist(),
               examples=[{"beta": [round(x, 3) for x in betas[i][:lens[i]]], "subgoals": subgoals[i][:lens[i]]}
                         for i in range(0, len(betas), max(1, len(betas) // 6))][:6])   # for the Fig. 6/A3 plot
    return out


def train_metacontroller(args: Args, model: GPT, data: dict, device, log: Logger, forced: bool, tag: str):
    """Minimise Eq. 3 on D* with the base model frozen; only the metacontroller's parameters train."""
    torch.manual_seed(args.seed + (7 if forced else 0))
    mc = MetaController(args).to(device)
    opt = torch.optim.AdamW(mc.parameters(), lr=args.mc_lr, weight_decay=args.weight_decay)
    rng, mid, t0 = np.random.default_rng(args.seed + (300 if forced else 200)), args.n_layer // 2, time.time()
    stream = sampled_batches(rng, data["dstar_train"], args.mc_batch, args.bucket_batches, device)
    for step in range(1, args.mc_steps + 1):
        b = next(stream)
        # KL warm-up: with the full alpha from step 1 the encoder learns to send nothing (KL -> 0, a collapsed
        # posterior) before the decoder has learned to use anything; ramping alpha avoids that.
        alpha = args.alpha * min(1.0, step / max(1.0, args.mc_kl_warmup * args.mc_steps))
        loss, nll, kl, beta, mask = mc_loss(model, mc, b, mid, alpha, forced)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mc.parameters(), args.grad_clip)
        opt.step()
        if step % args.log_every == 0 or step == args.mc_steps:
            rate = float(((beta >= 0.5).float() * mask)[:, 1:].sum() / mask[:, 1:].sum())
            log(f"10 {tag}", f"step {step}/{args.mc_steps} | nll {nll.item():.3f} | kl {kl.item():.3f} | switch rate "
                f"{rate:.3f} | {eta(t0, step, args.mc_steps)}", step=step, nll=nll.item(), kl=kl.item(), switch_rate=rate)
    return mc


def metacontroller_stage(args: Args, model: GPT, data: dict, device, log: Logger):
    """Train the metacontroller and its forced-switching ablation; measure switch alignment on held-out D*."""
    path = os.path.join(args.out, "metacontroller.pt")
    fp = fingerprint(args, "metacontroller")
    mcs = {"mc": MetaController(args).to(device), "mc_forced": MetaController(args).to(device)}
    ck = load_ckpt(path, fp, log, "10 metacontroller")
    if ck is not None:
        for k, m in mcs.items():
            load_weights(m, {"model": ck[k]}, path)
        log("10 metacontroller", f"reusing {path}")
        return mcs, ck["metrics"]
    t0, mid = time.time(), args.n_layer // 2
    mcs["mc"] = train_metacontroller(args, model, data, device, log, forced=False, tag="metacontroller")
    al = switch_alignment(model, mcs["mc"], data["dstar_heldout"][:args.n_probe // 2], mid, device)
    rate = al["switch_rate"]
    verdict = ("COLLAPSED: it never switches after the first step" if rate < 0.01 else
               "COLLAPSED: it switches at (almost) every step" if rate > 0.9 else "sparse switching")
    log("10 metacontroller", f"held-out D*: nll {al['nll']:.3f} | kl {al['kl']:.3f} | switch rate {rate:.3f} ({verdict}) | "
        f"switches vs subgoal boundaries (+-1 step): precision {al['precision']:.3f} recall {al['recall']:.3f} "
        f"F1 {al['f1']:.3f} | beta histogram (0..1, 10 bins) {al['beta_hist']}", **al)
    mcs["mc_forced"] = train_metacontroller(args, model, data, device, log, forced=True, tag="metacontroller-forced")
    forced_nll = switch_alignment(model, mcs["mc_forced"], data["dstar_heldout"][:args.n_probe // 2], mid, device)["nll"]
    log("10 metacontroller-forced", f"held-out D* nll {forced_nll:.3f} (beta = 1 at every step)")
    metrics = {"switch_f1": al["f1"], "switch_precision": al["precision"], "switch_recall": al["recall"],
               "switch_rate": rate, "switch_collapse": verdict, "mc_nll": al["nll"], "mc_kl": al["kl"],
               "beta_hist": al["beta_hist"], "beta_examples": al["examples"], "mc_forced_nll": forced_nll, "train_time_s": time.time() - t0}
    save_ckpt(path, {"fingerprint": fp, "metrics": metrics, **{k: m.state_dict() for k, m in mcs.items()}})
    return mcs, metrics


# ---------------------------------------------------------------------------------------------------
# 11. Internal RL: RL in the metacontroller's code space                 [P Sec. 8.1-8.2, Alg. 1-3, App. D.3]
# ---------------------------------------------------------------------------------------------------
# Internal RL is section 9's loop with a different agent. The non-causal encoder (it saw the future) is
# dropped; a causal policy pi(z | e at the decisions so far) takes its place. Everything else is frozen and
# becomes part of the environment (Alg. 1-2): the base model, the history GRU, the switching unit and
# the decoder. At each env step t:
#
#   e_t = lower_blocks(o_{1:t})                      the frozen model sees the whole history (KV cache)
#   switch if t = 1 or beta_t = f_switch(e_t, h_{t-1}, z_{t-1}) >= 0.5        (binarised, Alg. 2)
#   on a switch: z ~ pi(. | e at this and the earlier switches)              <- the RL action
#   otherwise:   z unchanged, so U = f_hyp(z) unchanged (a temporally-abstract action)
#   a_t ~ upper_blocks(e_t + U e_t); env.step(a_t)
#
# So the RL "episode" is the handful of switch points (about 6 on the post-training task if the switches
# sit at subgoal boundaries), not ~60 primitive steps, and each action is an 8-dim code instead of a move:
# the credit-assignment problem shrinks accordingly (App. E.2). The policy starts as the prior N(0, I),
# which is what the decoder was trained to understand. The forced-switching ablation runs the same code
# with the beta = 1 metacontroller: a new z at every step.
#
#   Symbol    | Shape        | Meaning
#   e_dec     | (B, K, D)    | residual e_{t,L/2} at the K decision points of each episode
#   z_dec     | (B, K, Z)    | the codes chosen there
#   mask      | (B, K)       | 1 for real decisions (episodes have different numbers of switches)

class ZPolicy(nn.Module):
    """pi(z_k | e_{t_1..t_k}): a GRU over the residuals at decision points, a Gaussian over z (init: N(0, I))."""

    def __init__(self, args: Args):
        super().__init__()
        self.gru = nn.GRU(args.n_embd, args.irl_hidden, batch_first=True)
        self.mu = nn.Linear(args.irl_hidden, args.n_z)
        nn.init.zeros_(self.mu.weight)                       # mean 0 and std 1 at the start: the prior N(0, I)
        nn.init.zeros_(self.mu.bias)
        self.log_std = nn.Parameter(torch.zeros(args.n_z))

    def log_prob(self, e_dec, z_dec):
        """log pi(z_k | e_{t_1..t_k}) for whole decision sequences: (B, K, D), (B, K, Z) -> (B, K)."""
        out, _ = self.gru(e_dec)                                                          # (B, K, H)
        return torch.distributions.Normal(self.mu(out), self.log_std.exp()).log_prob(z_dec).sum(-1)


class InternalAgent:
    """The frozen metacontroller parts plus the z-policy, as a stateful controller for rollout() (Alg. 1-2).

    rollout() calls ``agent(x, g)`` once per env step with x = e_{t,L/2} (n, 1, D) and adds the returned
    U_t x to the residual stream; ``g`` (the true subgoal) is ignored: internal RL never sees labels."""

    def __init__(self, mc: MetaController, policy: ZPolicy, n: int, seed: int, forced: bool):
        self.mc, self.pi, self.forced, self.t = mc, policy, forced, 0
        dev = policy.mu.weight.device
        self.h = torch.zeros(n, mc.history.hidden_size, device=dev)            # h_{t-1} of the history GRU
        self.z = torch.zeros(n, policy.mu.out_features, device=dev)           # z_{t-1}
        self.h_pi = torch.zeros(1, n, policy.gru.hidden_size, device=dev)     # the policy's own state
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.decide, self.e, self.zs = [], [], []                               # per step, for the update

    @torch.no_grad()
    def __call__(self, x, g=None):
        e = x[:, 0]                                                                       # (n, D) e_t
        if self.t == 0 or self.forced:
            decide = torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
        else:
            decide = self.mc.switch_prob(e, self.h, self.z) >= 0.5                        # ALGO LOGIC: Heaviside(beta - 0.5)
        out, h_pi = self.pi.gru(e[:, None], self.h_pi)                                  # (n, 1, H)
        mu = self.pi.mu(out[:, 0])
        z_new = mu + self.pi.log_std.exp() * torch.randn(mu.shape, generator=self.gen, device=e.device)  # ALGO LOGIC: z ~ pi
        self.z = torch.where(decide[:, None], z_new, self.z)                          # new code only on a switch
        self.h_pi = torch.where(decide[None, :, None], h_pi, self.h_pi)               # the policy advances only then
        self.decide.append(decide)
        self.e.append(e)
        self.zs.append(z_new)
        _, h = self.mc.history(e[:, None], self.h[None])                               # h_t = GRU(e_t, h_{t-1})
        self.h, self.t = h[0], self.t + 1
        A, Bm = self.mc.factors(self.z)                                                 # (n, D, r) each
        return apply_controller(x, A[:, None], Bm[:, None])                             # U_t e_t (n, 1, D)

    def decisions(self, lengths):
        """Compact each episode's decision points into (n, K) sequences: e_dec, z_dec, mask."""
        T = len(self.decide)
        dec = torch.stack(self.decide, 1) & (step_mask(lengths, T) > 0)                   # (n, T) only real steps
        e, z = torch.stack(self.e, 1), torch.stack(self.zs, 1)                           # (n, T, D), (n, T, Z)
        K = int(dec.sum(1).max())
        e_dec, z_dec = e.new_zeros(e.shape[0], K, e.shape[2]), z.new_zeros(z.shape[0], K, z.shape[2])
        mask = torch.zeros(e.shape[0], K, device=e.device)
        for i in range(e.shape[0]):
            idx = dec[i].nonzero()[:, 0]
            e_dec[i, :len(idx)], z_dec[i, :len(idx)], mask[i, :len(idx)] = e[i, idx], z[i, idx], 1.0
        return e_dec, z_dec, mask


@torch.no_grad()
def prior_code_diagnostic(model: GPT, mc: MetaController, layer: int, seed: int, device, n_codes: int = 16,
                          n_eps: int = 32) -> dict:
    """What do codes drawn from the prior do? This is what the untrained internal-RL policy explores with.

    Each of ``n_codes`` codes z ~ N(0, I) is held fixed (U = f_hyp(z) throughout) for ``n_eps`` post-training
    episodes on different layouts; we record the first colour each episode steps on. A code that means
    "go to pair k" sends most of its episodes to a colour of pair k: its *consistency* (the share of its
    episodes that go to its most common pair) is high, and different codes should cover different pairs.
    The uncontrolled base model on the same layouts is the reference."""
    z = torch.randn(n_codes, mc.decoder[0].in_features, generator=torch.Generator().manual_seed(seed)).to(device)
    z = z.repeat_interleave(n_eps, 0)[:, None]                                          # (n_codes * n_eps, 1, Z)
    r = rollout(model, gw.POSTTRAIN_TASK, n_codes * n_eps, seed, device, ctrl_fn=lambda x, g: mc.apply(z, x),
                ctrl_layer=layer, record=True)
    base = rollout(model, gw.POSTTRAIN_TASK, n_codes * n_eps, seed, device, record=True)
    def pairs(first, n):                        # per code: share going to its most common pair, and that pair
        out = []
        for c in range(len(first) // n):
            p = [f // 2 for f in first[c * n:(c + 1) * n] if f >= 0]
            top = max(range(gw.N_SUBGOALS), key=p.count) if p else -1
            out.append((p.count(top) / n if p else 0.0, top))
        return out
    codes, ref = pairs(r["first_colour"], n_eps), pairs(base["first_colour"], n_eps)
    return {"consistency": float(np.mean([c for c, _ in codes])), "base_consistency": float(np.mean([c for c, _ in ref])),
            "distinct_pairs": len({p for _, p in codes if p >= 0}), "top_pairs": [p for _, p in codes]}


@torch.no_grad()
def subgoal_codes(model: GPT, mc: MetaController, episodes: list, layer: int, device):
    """The mean code z_t (posterior means) the metacontroller uses during each ground-truth subgoal on D*: (K, Z).

    Analysis only (it uses the labels): switching these codes by the true subgoal asks whether the
    learned code space can express the post-training task at all, as section 8 asked of the base model."""
    sums = torch.zeros(gw.N_SUBGOALS, mc.decoder[0].in_features, device=device)         # (K, Z)
    counts = torch.zeros(gw.N_SUBGOALS, device=device)
    for b in batches_of(episodes, 256, device):
        e = model.lower(b["obs"], layer)
        z, _, _ = mc(e, (b["actions"] >= 0).sum(1), sample=False)                       # (B, T, Z)
        m = b["subgoals"] >= 0
        sums.index_add_(0, b["subgoals"][m], z[m])
        counts += torch.bincount(b["subgoals"][m], minlength=gw.N_SUBGOALS).float()
    return sums / counts.clamp(min=1)[:, None]                                           # (K, Z)


def internal_rl(args: Args, model: GPT, mc: MetaController, seed: int, device, log: Logger, forced: bool, name: str):
    """Internal RL (Alg. 3): section 9's loop, but the actions are codes z at switch points."""
    mc.requires_grad_(False)                                   # base, switch, decoder, history: all frozen
    torch.manual_seed(args.seed + (11 if forced else 10))
    policy = ZPolicy(args).to(device)                          # the only trainable part
    mid = args.n_layer // 2

    def collect(n, s):
        agent = InternalAgent(mc, policy, n, s + 1, forced)
        r = rollout(model, gw.POSTTRAIN_TASK, n, s, device, ctrl_fn=agent, ctrl_layer=mid, record=True)
        e_dec, z_dec, mask = agent.decisions(r["lengths"])                              # ALGO LOGIC: act = z at switches
        return {"rewards": r["rewards"], "e": e_dec, "z": z_dec, "mask": mask, "n_decisions": float(mask.sum(1).mean())}

    logp_fn = lambda b: policy.log_prob(b["e"], b["z"])                                  # ALGO LOGIC: log pi(z | e)
    m = rl_train(args, f"11 {name}", collect, logp_fn, list(policy.parameters()), args.irl_lr, seed, log)
    return policy, collect, m


def rl_stage(args: Args, model: GPT, mcs: dict, data: dict, device, log: Logger) -> dict:
    """Token-level RL, internal RL and the forced-switching ablation, same episode budget, same final test."""
    fp = fingerprint(args, "rl")
    train_seed, test_seed = data["eval_seed"] + 3 * 10 ** 6, data["eval_seed"] + 2 * 10 ** 6   # disjoint env seeds
    results, mid = {}, args.n_layer // 2
    # Before any RL: what do codes from the prior do? (the untrained internal-RL policy samples exactly these)
    pc = prior_code_diagnostic(model, mcs["mc"], mid, data["eval_seed"] + 4 * 10 ** 6, device)
    log("11 internal_rl", f"prior codes held fixed for whole episodes: {pc['distinct_pairs']} of 4 subgoals are some "
        f"code's most common first pair; consistency {pc['consistency']:.2f} (share of a code's episodes going to "
        f"its most common pair; uncontrolled base model on the same layouts {pc['base_consistency']:.2f})", **pc)
    results["prior_codes"] = pc
    # ... and the best case for a policy that picks one code per subgoal: the metacontroller's mean code
    # for each true subgoal, switched by the true subgoal (a diagnostic that uses labels, like section 8).
    codes = subgoal_codes(model, mcs["mc"], data["dstar_heldout"][:args.n_probe // 2], mid, device)
    fn = lambda x, g: mcs["mc"].apply(codes[g], x)                                       # g (n, 1) -> z (n, 1, Z)
    ev = dict(n=args.n_eval, device=device, ctrl_fn=fn, ctrl_layer=mid)
    oc = {"pretrain": rollout(model, None, seed=data["eval_seed"], pretrain_tasks=True, **ev)["success"],
          "posttrain": rollout(model, gw.POSTTRAIN_TASK, seed=data["eval_seed"] + 10 ** 6, **ev)["success"]}
    log("11 internal_rl", f"the metacontroller's mean code per true subgoal, switched by the true subgoal: success "
        f"pretraining tasks {oc['pretrain']:.3f} | post-training task {oc['posttrain']:.3f} (ground-truth controllers, "
        f"section 8: see above)", **oc)
    results["oracle_codes"] = oc
    for name in ("token_rl", "internal_rl", "internal_rl_no_temporal"):
        path = os.path.join(args.out, f"{name}.pt")
        tag = f"9 {name}" if name == "token_rl" else f"11 {name}"
        ck = load_ckpt(path, fp, log, tag)
        if ck is not None:
            log(tag, f"reusing {path}")
            results[name] = ck["metrics"]
            continue
        t0 = time.time()
        if name == "token_rl":
            policy, m = token_rl(args, model, train_seed, device, log)
            test = rollout(policy, gw.POSTTRAIN_TASK, args.rl_eval, test_seed, device)
        else:
            forced = name.endswith("no_temporal")
            mc = mcs["mc_forced" if forced else "mc"]
            policy, collect, m = internal_rl(args, model, mc, train_seed, device, log, forced, name)
            agent = InternalAgent(mc, policy, args.rl_eval, test_seed + 1, forced)
            test = rollout(model, gw.POSTTRAIN_TASK, args.rl_eval, test_seed, device, ctrl_fn=agent, ctrl_layer=mid,
                           record=True)
            m["decisions_per_episode"] = float(agent.decisions(test["lengths"])[2].sum(1).mean())
        m.update(success=test["success"], colours=test["colours"], wrong_colour=test["wrong_colour"],
                 train_time_s=time.time() - t0)
        log(tag, f"final test on {args.rl_eval} post-training episodes (unseen env seeds): success "
            f"{test['success']:.3f} | {test['colours']:.1f} of 12 colours | trained on {m['episodes']} episodes "
            f"in {m['train_time_s']:.0f}s", success=test["success"])
        results[name] = m
        save_ckpt(path, {"fingerprint": fp, "metrics": m})
    return results


# ---------------------------------------------------------------------------------------------------
# 12. Figures
# ---------------------------------------------------------------------------------------------------
def make_figures(args: Args, results: dict) -> list:
    """PNG figures in the run folder: the env, pretraining diagnostics, probe accuracy by layer (Fig. A1), controller
    success by layer (Fig. 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(os.path.join(args.out, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    # the env (Fig. 2 style): one pretraining-task layout, rendered by the env's own rgb_array mode
    E = env_module(args.task)
    try:
        env = E.GridPinpadEnv(render_mode="rgb_array") if args.task == "grid" else E.AntPinpadEnv(render_mode="rgb_array")
        env.reset(seed=args.seed, options={"task": E.PRETRAIN_TASKS[0]})
        img = env.render()
    except Exception as e:  # noqa: BLE001 -- MuJoCo needs an OpenGL backend; the other figures do not
        if args.task == "grid":
            raise
        img = None
        print(f"[12 figures] no env.png: MuJoCo cannot render here ({type(e).__name__}); try MUJOCO_GL=egl")
    if img is not None:
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        ax.imshow(img)
        ax.set(xticks=[], yticks=[], title="gridworld-pinpad (black: agent, grey: walls)" if args.task == "grid" else
               "ant-pinpad (colours 0-3: red, orange, green, blue; dark: wall)")
        ax.title.set_fontsize(8)
        save(fig, "env.png")
    curve = results.get("pretrain", {}).get("curve", [])
    if curve and args.task == "ant":             # the ant: held-out NLL, action error and probe gap
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        mins = [c["minutes"] for c in curve]
        ax.plot(mins, [c["mse"] for c in curve], "o-", label="mean-action squared error")
        ax.plot(mins, [c["probe_mid"] - c["probe_l0"] for c in curve], "s-", label="probe gap, layer L/2 - layer 0")
        ax.set(xlabel="pretraining minutes", title="Pretraining diagnostics (held-out)")
        ax.legend(frameon=False, fontsize=7)
        save(fig, "pretrain_curve.png")
    elif curve:                                  # the pretraining diagnostics against training minutes
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        mins = [c["minutes"] for c in curve]
        ax.plot(mins, [c["opt_acc_pair"] for c in curve], "o-", label="optimal-action acc, pair-determined")
        ax.plot(mins, [c["opt_acc_ambiguous"] for c in curve], "o-", label="optimal-action acc, ambiguous")
        ax.plot(mins, [c["probe_mid"] - c["probe_l0"] for c in curve], "s-", label="probe gap, layer L/2 - layer 0")
        ax.set(xlabel="pretraining minutes", ylim=(0, 1), title="Pretraining diagnostics (held-out)")
        ax.legend(frameon=False, fontsize=7)
        save(fig, "pretrain_curve.png")
    if "probe_accuracy" in results:
        acc = results["probe_accuracy"]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot(range(len(acc)), acc, "o-", color="C0")
        ax.axhline(0.25, ls=":", color="grey", label="chance")
        ax.set(xlabel="layer l (0 = embedding)", ylabel="held-out accuracy", title="Linear probe of the current subgoal",
               xticks=range(len(acc)), ylim=(0, 1))
        ax.legend(frameon=False)
        save(fig, "probe_accuracy.png")
    if "controller_success" in results:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        L1 = len(results["controller_success"])
        for key, label, c in (("controller_success_pretrain", "pretraining tasks", "C0"),
                              ("controller_success", "post-training task", "C3")):
            xs = [l for l in range(L1) if results[key][l] is not None]
            ax.plot(xs, [results[key][l] for l in xs], "o-", color=c, label=f"controllers, {label}")
        ax.axhline(results["base_success_pretrain"], ls="--", color="C0", alpha=0.6, label="base alone, pretraining")
        ax.axhline(results["base_success"], ls="--", color="C3", alpha=0.6, label="base alone, post-training")
        ax.set(xlabel="controlled layer l", ylabel="success rate", title="Ground-truth subgoal controllers",
               xticks=range(L1), ylim=(0, 1))
        ax.legend(frameon=False, fontsize=7)
        save(fig, "controller_success.png")
    if "beta_examples" in results:              # Fig. 6 / A3: beta_t over time, ground-truth subgoals as bands
        ex = results["beta_examples"]
        fig, axes = plt.subplots(len(ex), 1, figsize=(5.5, 1.1 * len(ex) + 0.6), sharex=True, squeeze=False)
        for ax, e in zip(axes[:, 0], ex):
            for t, g in enumerate(e["subgoals"]):
                ax.axvspan(t - 0.5, t + 0.5, color=f"C{g}", alpha=0.25, lw=0)
            ax.plot(range(len(e["beta"])), e["beta"], "k.-", lw=1, ms=3)
            ax.axhline(0.5, ls=":", color="grey", lw=0.8)
            ax.set(ylim=(-0.05, 1.05), yticks=[0, 1], ylabel="beta")
        axes[0, 0].set_title(f"Switching gate on held-out D* (bands: true subgoal; F1 {results['switch_f1']:.2f})", fontsize=8)
        axes[-1, 0].set_xlabel("time step t")
        save(fig, "beta_traces.png")
    methods = [(k, lab) for k, lab in (("internal_rl", "internal RL"), ("internal_rl_no_temporal", "internal RL, beta = 1"),
                                       ("token_rl", "token-level RL")) if k in results]
    if methods:                                  # Fig. 8 (linear) and Fig. A5 (log episodes)
        for xscale, name in (("linear", "rl_curves.png"), ("log", "rl_curves_log.png")):
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for k, lab in methods:
                c = np.array(results[k]["curve"])
                w = max(1, len(c) // 20)                     # moving average over batches, for readability
                smooth = np.convolve(c[:, 1], np.ones(w), "same") / np.convolve(np.ones(len(c)), np.ones(w), "same")
                ax.plot(c[:, 0], smooth, label=f"{lab} (test {results[k]['success']:.2f})")
            ax.set(xscale=xscale, xlabel="training episodes", ylabel="success (training batches)", ylim=(-0.02, 1.02),
                   title="Post-training task, sparse reward")
            if xscale == "log":                  # Fig. A5: log axes, so that rare early successes show
                ax.set_yscale("symlog", linthresh=1e-3)
                ax.set_ylim(0, 1.02)
            ax.legend(frameon=False, fontsize=7)
            save(fig, name)
    return paths


# ---------------------------------------------------------------------------------------------------
# 13. main(): the stages in order
# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    seed_everything(args.seed)
    log = Logger(args.out)
    log("1 args", " ".join(f"{k}={v}" for k, v in dataclasses.asdict(args).items()))
    t_start, stage_time = time.time(), {}
    results = {"task": args.task, "seed": args.seed, "device": str(device), "args": dataclasses.asdict(args)}

    def write_results():
        results["wall_time_s"] = time.time() - t_start
        results["stage_time_s"] = stage_time
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    def finish():
        figs = make_figures(args, results)
        write_results()
        log("13 main", f"done in {results['wall_time_s'] / 60:.1f} min (stage {args.stop_after}) | results.json and "
            f"figures in {args.out}: {', '.join(os.path.basename(f) for f in figs)}")
        return results

    if args.task == "ant":                       # fail early, with the fix, where MuJoCo cannot load
        try:
            env_module("ant").AntPinpadEnv().close()
        except Exception as e:  # noqa: BLE001
            sys.exit(f"internal_rl.py: error: --task ant needs MuJoCo ({type(e).__name__}: {str(e)[:120]}); "
                     f"pip install -r requirements.txt (gymnasium[mujoco], mujoco)")
    t = time.time()
    data = make_datasets(args, log)
    stage_time["data"] = time.time() - t
    log("3 data", f"held-out D {len(data['heldout'])} episodes, D* {len(data['dstar_train'])} train + "
        f"{len(data['dstar_heldout'])} held-out ({stage_time['data']:.1f}s)")

    t = time.time()
    model, m = pretrain(args, data, device, log)
    stage_time["pretrain"] = time.time() - t
    results["pretrain"] = m
    for p in model.parameters():               # frozen from here on
        p.requires_grad_(False)
    model.eval()
    write_results()
    if args.stop_after == "pretrain":
        return finish()

    t = time.time()
    results.update({k: v for k, v in probe_stage(args, model, data, device, log).items() if k != "train_time_s"})
    stage_time["probe"] = time.time() - t
    write_results()
    if args.stop_after == "probe":
        return finish()

    t = time.time()
    results.update({k: v for k, v in controller_stage(args, model, data, device, log).items() if k != "train_time_s"})
    stage_time["controllers"] = time.time() - t
    write_results()
    mid = args.n_layer // 2
    log("13 main", f"probe layer 0 {results['probe_accuracy'][0]:.3f} -> layer {mid} {results['probe_accuracy'][mid]:.3f} "
        f"| controllers at layer {mid}: pretraining tasks {results['controller_success_pretrain'][mid]} / post-training "
        f"{results['controller_success'][mid]} | base alone {results['base_success_pretrain']:.3f} / {results['base_success']:.3f}")
    if args.stop_after == "controllers":
        return finish()

    t = time.time()
    mcs, m = metacontroller_stage(args, model, data, device, log)
    results.update({k: v for k, v in m.items() if k != "train_time_s"})
    stage_time["metacontroller"] = time.time() - t
    write_results()
    if args.stop_after == "metacontroller":
        return finish()

    t = time.time()
    results.update(rl_stage(args, model, mcs, data, device, log))
    stage_time["rl"] = time.time() - t
    log("13 main", f"switch F1 {results['switch_f1']:.3f} | post-training success after {args.rl_episodes} episodes: "
        f"token-level RL {results['token_rl']['success']:.3f}, internal RL {results['internal_rl']['success']:.3f}, "
        f"internal RL without temporal abstraction {results['internal_rl_no_temporal']['success']:.3f}")
    return finish()


if __name__ == "__main__":
    main()
