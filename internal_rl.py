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
    python internal_rl.py --task ant                               # the MuJoCo ant, every stage
    python -m pytest -q test_internal_rl.py                        # the tests, about a minute
Outputs go to ``--out`` (default ``runs/<task>-seed<seed>``): checkpoints (``*.pt``), ``metrics.jsonl``
(one JSON line per log line), figures (``*.png``) and ``results.json``. A rerun reuses every finished stage
whose settings and code are unchanged; a changed setting or an edited function retrains the stages that read
it and every stage built on them (section 2); ``--fresh`` retrains all. Ctrl-C keeps the finished stages (and
pretraining's last evaluation): rerun the same command to continue.

What to expect (2-core CPU, defaults; the README has the measured tables and what they mean)
    Grid: ~35 min for every stage on a fast day (up to ~1.8x longer on a slow one). The current subgoal becomes
    linearly decodable mid-depth (probe ~0.38 at the input -> ~0.57-0.58 at layer L/2, chance 0.25) and
    ground-truth controllers steer the pretraining tasks (success 0.72-0.75, base model 0.06-0.08), but the
    post-training task's unseen subgoal order only rarely (0.00-0.09), although controllers that also saw
    post-training episodes (a logged diagnostic) steer it in ~0.5 of episodes. The kept metacontroller of six
    switches at the subgoal boundaries on seeds 0 and 2 (switch F1 0.998, 0.984; seed 1: 0.14), but its codes
    name a direction, not a subgoal, and no RL method has solved the task at CPU scale.
    Ant: every stage in 27-60 min, by the day, but no subgoal code emerges yet (probes at chance), so the stages after
    pretraining have nothing to steer with (README).

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
    K subgoals (4: colour pairs in the grid, colours on the ant)   r controller rank (16)   Z code size (n_z = 8)
    e_{t,l} residual at step t after block l (l = 0: the input embedding)   U a D x D controller, e <- e + U e

Deliberate choices and deviations from the paper (the README gives the reasons and measurements)
    * Size: d=64, 4 blocks, 4 heads, ~6e5 training episodes (paper: d=256, 6 blocks, ~2.6e8), for the CPU
      budget; the controlled layer is L/2 = 2 as in the paper; pretraining ends with a linear lr cool-down.
    * Input embedding (the paper leaves it open): objects re-indexed around the agent plus the agent's cell; no
      task information, and the subgoal code emerged ~8x faster per CPU-second than a flat one-hot (PAPER.md 13).
    * Object attention (grid, --obj-attn): the top block also attends over the current step's objects (section 4).
    * Next-observation loss: cross-entropy on the agent's next cell (the only part of o_{t+1} that changes).
    * Shorter schedules, larger learning rates than Tables A4/A6/A7/A9 (values in Args); alpha ramps up over
      the first 600 metacontroller steps on the grid, 30% of them on the ant (without it the posterior
      collapsed). RL: 24,576 episodes each.
    * Sequence embedder, history GRU and z-policy are GRUs (the paper: Hawk SSMs).
    * Grid: six metacontroller seeds screened at 1,000 steps, the lowest held-out Eq. 3 kept and trained on
      to 3,000 for RL (the paper trains 3 and reports their median).
    * The ant (ant_tasks.py): the same transformer (paper: a Hawk SSM) with a linear input embedding and a
      Gaussian action head, no next-observation loss (Table A5: lambda 10); a hand-designed expert (paper:
      PPO); full-rank controllers and decoder (Table A8).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
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
# Every tunable number of the file lives here, grouped by the section that uses it; `--help` prints the
# same text. Per-task overrides sit in TASK_PRESETS just below, so the grid and ant defaults can be
# compared in one place. The defaults are what the README's numbers were measured with.
def arg(default, help: str):
    """A dataclass field that carries its own --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # -- run --
    task: str = arg("grid", "environment: grid (gridworld-pinpad) or ant (ant-pinpad, MuJoCo)")
    seed: int = arg(0, "seed for everything (data, init, evaluation episodes)")
    device: str = arg("auto", "cpu, cuda, or auto (cuda when present)")
    out: str = arg("", "run folder (default runs/<task>-seed<seed>)")
    stop_after: str = arg("rl", "last stage to run: pretrain, probe, controllers, metacontroller or rl")
    threads: int = arg(0, "torch CPU threads (0 = all cores)")
    log_every: int = arg(200, "log a training line every this many steps")
    fresh: bool = arg(False, "retrain every stage: delete the run folder's checkpoints first")
    # -- data (section 3) --
    epsilon: float = arg(0.0, "expert noise for dataset D: probability of a random non-terminating action (paper: 0)")
    batch_size: int = arg(64, "episodes per pretraining batch (padded; batches are length-bucketed)")
    bucket_batches: int = arg(8, "batches generated together and sorted by length, to cut padding")
    n_heldout: int = arg(2000, "held-out episodes of D (pretraining metrics)")
    n_dstar: int = arg(8000, "episodes of the clean set D* (epsilon = 0) for controllers; as many again held out")
    n_train: int = arg(0, "episodes of a stored dataset D, reused every epoch (ant); 0 = fresh episodes every step (grid)")
    action_noise: float = arg(0.0, "ant: std of Gaussian noise on the expert's actions in D (D* never has any)")
    workers: int = arg(2, "processes that generate stored expert episodes (ant; one training job per machine)")
    expert_eval: int = arg(200, "ant: post-training episodes that measure the expert's success (RL is normalised by it)")
    # -- base model (section 4) --
    n_layer: int = arg(4, "transformer blocks L (paper: 6)")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(64, "residual width D (paper: 256)")
    obj_attn: str = arg("", "grid: blocks that also attend over the 12 objects of the current step (object attention, "
                            "a deviation; see section 4): 'last' (block L, the grid preset), a comma list of 1..L, "
                            "e.g. '3,4', or '' = none")
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
    ctrl_oracle: bool = arg(True, "grid diagnostic, not the paper's protocol: also train controllers at L/2 on D* plus "
                                  "expert episodes of the post-training task (is the model steerable there at all?)")
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
    mc_steps: int = arg(2000, "metacontroller optimiser steps (grid preset: 3000; Table A9: 64,000 at batch 512)")
    mc_batch: int = arg(128, "D* episodes per metacontroller batch")
    mc_lr: float = arg(3e-3, "metacontroller learning rate (Table A9: 1e-3)")
    mc_kl_warmup: float = arg(0.3, "fraction of the steps over which alpha ramps up from 0 (grid preset: 0.2, i.e. 600 "
                                  "steps; the paper: none)")
    mc_gumbel: float = arg(0.0, "Gumbel-sigmoid temperature of beta in training, 0 = plain sigmoid (paper: plain; "
                                "Gumbel for its grid rate-distortion plot)")
    mc_seeds: int = arg(1, "metacontrollers trained (seeds seed, seed + 1000, ...); the one with the lowest held-out "
                           "Eq. 3 is kept, a label-free choice (grid preset: 6; the paper trains 3, reports their median)")
    mc_screen: float = arg(1.0, "with --mc-seeds > 1: fraction of --mc-steps every seed trains before the choice; the "
                                "kept one then trains on to --mc-steps (1 = every seed trains fully; grid preset: 1/3)")
    # -- internal RL (section 11) --
    irl_lr: float = arg(1e-3, "AdamW learning rate of the internal-RL policy (Table A13: 3e-5 after a scan)")
    irl_hidden: int = arg(64, "GRU width of the causal z-policy (Table A13: a 1-layer SSM of width 256)")


# Per-task defaults: everything not listed here takes the dataclass default above.
TASK_PRESETS = {
    # The grid: object attention in the top block (section 4); six metacontroller seeds screened at 1,000
    # steps, the kept one trained on to 3,000 (section 10); the KL warm-up stays 600 steps (0.2 x 3,000).
    "grid": dict(obj_attn="last", mc_seeds=6, mc_screen=1 / 3, mc_steps=3000, mc_kl_warmup=0.2),
    # The ant: D is a stored set (section 3); episodes are ~270 steps, so batches hold fewer; controllers and
    # the metacontroller's decoder are full rank (Table A8).
    # Sized for the issue's 60 minutes on a 2-core CPU: every stage took 59.7 min on a slow day, 27.1 on a
    # fast one (README).
    "ant": dict(n_train=2500, action_noise=0.03, n_heldout=200, n_dstar=400, n_embd=128, batch_size=16,
                pretrain_steps=2000, lr=1e-3, obs_coef=0.0, eval_every=500, log_every=100, quick_probe_episodes=200,
                n_probe=400, ctrl_rank=0, ctrl_batch=16, ctrl_steps=400, ctrl_layers="mid", n_eval=100,
                mc_steps=150, mc_batch=16, rl_episodes=1024, rl_batch=64, rl_eval=200),
}
STAGES = ("pretrain", "probe", "controllers", "metacontroller", "rl")


def die(msg: str):
    """Stop with one line on stderr and no traceback: bad input, unreadable checkpoints, missing MuJoCo."""
    sys.exit(f"internal_rl.py: error: {msg}")


# settings that may be 0 (every other number must be positive; none may be negative)
MAY_BE_ZERO = ("seed", "epsilon", "obs_coef", "weight_decay", "warmup", "cooldown", "threads", "alpha", "mc_kl_warmup",
               "mc_gumbel", "n_train", "action_noise", "ctrl_rank")
ANT_ONLY = ("n_train", "action_noise", "workers", "expert_eval")        # the grid has no stored dataset


def parse_args(argv=None) -> Args:
    """Build argparse from the dataclass, apply the task preset, validate; bad input exits in one line."""
    p = argparse.ArgumentParser(description="Internal RL reference implementation (arXiv 2512.20605).")
    for f in dataclasses.fields(Args):          # f.type is a string ("int", ...): annotations are postponed
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            p.add_argument(name, type={"int": int, "float": float, "str": str}[f.type], default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default {f.default!r})")
    given = vars(p.parse_args(argv))
    task = given.get("task", Args.task)
    if task not in TASK_PRESETS:
        die(f"unknown --task {task!r}; valid choices: {', '.join(TASK_PRESETS)}")
    args = Args(**{**TASK_PRESETS[task], **given})
    if args.stop_after not in STAGES:
        die(f"unknown --stop-after {args.stop_after!r}; valid choices: {', '.join(STAGES)}")
    if task == "grid" and args.ctrl_rank == 0:
        die("--ctrl-rank 0 (full rank) is for the ant; the grid's controllers and metacontroller decoder need a "
            "rank, e.g. 16")
    for f in dataclasses.fields(Args):
        v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            die(f"{flag} must be a finite number, got {v}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or (v == 0 and f.name not in MAY_BE_ZERO)):
            die(f"{flag} must be {'non-negative' if f.name in MAY_BE_ZERO else 'positive'}, got {v}")
        if task == "grid" and f.name in ANT_ONLY and f.name in given:
            die(f"{flag} is for the ant; the grid draws fresh expert episodes every step")
    if not args.cooldown <= 1.0:
        die(f"--cooldown is a fraction of the steps in [0, 1], got {args.cooldown}")
    if not args.mc_screen <= 1.0:
        die(f"--mc-screen is a fraction of --mc-steps in (0, 1], got {args.mc_screen}")
    if args.n_probe < 2 or args.quick_probe_episodes < 2:
        die("--n-probe and --quick-probe-episodes need at least 2 episodes (half fit, half score)")
    if args.mc_seeds > 1 and args.n_dstar < args.n_probe:
        die(f"--mc-seeds {args.mc_seeds} chooses on held-out D*[n_probe/2:n_probe]: --n-dstar ({args.n_dstar}) must "
            f"be at least --n-probe ({args.n_probe}); lower --n-probe, or train one metacontroller with --mc-seeds 1")
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        die(f"--device {args.device!r} is not available here; valid choices: auto, cpu"
            + (", cuda" if torch.cuda.is_available() else " (no CUDA device found)"))
    if args.task == "ant" and not args.n_train:
        die("--task ant needs a stored dataset: --n-train must be positive")
    if not 0.0 <= args.epsilon < 1.0:
        die(f"--epsilon must be in [0, 1), got {args.epsilon}")
    if args.n_embd % args.n_head:
        die(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    try:
        ctrl_layers(args)
        obj_attn_blocks(args)
    except ValueError as e:
        die(str(e))
    args.out = args.out or os.path.join("runs", f"{args.task}-seed{args.seed}")
    return args


def obj_attn_blocks(args: Args) -> list:
    if not args.obj_attn:
        return []
    if args.task != "grid":
        raise ValueError("--obj-attn is for the grid (the ant's observation has no objects)")
    try:
        blocks = [args.n_layer] if args.obj_attn == "last" else [int(s) for s in args.obj_attn.split(",")]
    except ValueError:
        blocks = [0]
    if any(not 1 <= l <= args.n_layer for l in blocks):
        raise ValueError(f"--obj-attn must be 'last', '' or blocks in 1..{args.n_layer}, e.g. '3,4', got {args.obj_attn!r}")
    return blocks


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
# 2. Plumbing: logging, and checkpoints that know what made them              # BOILERPLATE
# Not part of the method: runs are reproducible (one seed, set in main(), fixes every number on the CPU),
# observable (fixed-format log lines with throughput and ETA, also as JSON in metrics.jsonl) and restartable:
# every stage saves its checkpoint <out>/<name>.pt stamped with a *fingerprint* of what made it, and a rerun
# reuses a checkpoint only while its fingerprint still matches. The fingerprint hashes
#   * the stage's settings (the Args fields listed in CHECKPOINTS below),
#   * the stage's code: every function, class and constant of sections 3-11 that its entry points reach by
#     name, compared as syntax trees (comments, docstrings and layout do not count), plus the env file for
#     the data and pretraining stages,
#   * the checksum of the checkpoint it builds on, so that a retrained parent retrains its children.
# So editing mc_loss retrains the metacontroller and internal RL, while editing a figure, a comment or the
# README retrains nothing. Every checkpoint also stores a checksum of its contents, checked on every load.
class Logger:
    """Print-first logging: one fixed-format line per event, also appended to metrics.jsonl."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.jsonl")

    def __call__(self, stage: str, msg: str, **metrics):
        print(f"[{stage}] {msg}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(finite({"time": time.time(), "stage": stage, "msg": msg, **metrics})) + "\n")


def finite(x):
    """x with every non-finite float replaced by None, so that the JSON written is valid (NaN is not JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def eta(t0: float, done: int, total: int) -> str:
    """Progress string, e.g. '12s elapsed, eta 45s'."""
    el = time.time() - t0
    left = el / max(done, 1) * (total - done)
    return f"{el:.0f}s elapsed, eta {left:.0f}s"


RL_FIELDS = ("rl_episodes", "rl_batch", "rl_epochs", "clip_coef", "rl_eval", "expert_eval")
# Every checkpoint of a run folder, in pipeline order: its section (the log prefix), the checkpoint it builds
# on, the settings it reads and the entry points of its code. The grid has no "data" checkpoint: its
# episodes are generated from the seed by section 3, whose code is part of pretraining's fingerprint.
CHECKPOINTS = {
    "data": (3, None, ("task", "seed", "n_train", "action_noise", "n_heldout", "n_dstar", "expert_eval"),
             ("ant_datasets",)),
    "pretrain": (6, "data", ("task", "seed", "epsilon", "n_heldout", "n_train", "action_noise", "batch_size",
                             "bucket_batches", "n_layer", "n_head", "n_embd", "obj_attn", "mlp_mult", "rel_buckets",
                             "rel_max_distance", "pretrain_steps", "lr", "warmup", "cooldown", "weight_decay",
                             "obs_coef", "grad_clip", "eval_every", "quick_probe_episodes", "quick_probe_steps",
                             "probe_lr"), ("make_datasets", "pretrain")),
    "probe": (7, "pretrain", ("n_dstar", "n_probe", "probe_steps", "probe_lr"), ("probe_stage",)),
    "controllers": (8, "pretrain", ("n_dstar", "n_probe", "ctrl_rank", "ctrl_steps", "ctrl_batch", "ctrl_lr",
                                    "ctrl_layers", "n_eval", "greedy", "ctrl_oracle"), ("controller_stage",)),
    "metacontroller": (10, "pretrain", ("n_dstar", "n_probe", "alpha", "n_z", "mc_hidden", "mc_enc_hidden",
                                        "ctrl_rank", "mc_steps", "mc_batch", "mc_lr", "mc_kl_warmup", "mc_gumbel",
                                        "bucket_batches", "mc_seeds", "mc_screen"), ("metacontroller_stage",)),
    "token_rl": (9, "pretrain", RL_FIELDS + ("token_lr",), ("token_rl",)),
    "internal_rl": (11, "metacontroller", RL_FIELDS + ("irl_lr", "irl_hidden"), ("internal_rl",)),
    "internal_rl_no_temporal": (11, "metacontroller", RL_FIELDS + ("irl_lr", "irl_hidden"), ("internal_rl",)),
}


def syntax(tree) -> str:
    """A syntax tree as text, without docstrings: what the code does, not how it is commented."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.lru_cache(maxsize=None)
def code_index(path: str) -> dict:
    """{name: (its syntax, the names it uses)} for every top-level definition in sections 3-11 of ``path``."""
    src, index, section = open(path).read(), {}, 0
    lines = src.splitlines()
    banners = {i + 2: int(m[1]) for i, line in enumerate(lines[:-1])
               if line.startswith("# ---") and (m := re.match(r"# (\d+)\. ", lines[i + 1]))}
    for node in ast.parse(src).body:
        section = max([s for line, s in banners.items() if line < node.lineno], default=0)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        else:
            continue
        if 3 <= section <= 11:
            uses = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            for name in names:
                index[name] = (syntax(node), uses)
    return index


@functools.lru_cache(maxsize=None)
def code_digest(roots: tuple, env_file: str = "") -> str:
    """Hash of the code that the functions ``roots`` reach by name (and of ``env_file``, if given)."""
    index, seen, todo = code_index(os.path.abspath(__file__)), set(), list(roots)
    while todo:
        name = todo.pop()
        if name in index and name not in seen:
            seen.add(name)
            todo += index[name][1]
    text = "".join(index[name][0] for name in sorted(seen))
    return hashlib.sha256((text + (syntax(ast.parse(open(env_file).read())) if env_file else "")).encode()).hexdigest()


def fingerprint(args: Args, name: str, parent_sum: str = "") -> str:
    """What made a checkpoint: its settings, its code and the checksum of the checkpoint it builds on."""
    _, _, fields, roots = CHECKPOINTS[name]
    env_file = env_module(args.task).__file__ if name in ("data", "pretrain") else ""
    cfg = json.dumps({k: getattr(args, k) for k in fields}, sort_keys=True)
    return hashlib.sha256((cfg + code_digest(roots, env_file) + parent_sum).encode()).hexdigest()[:16]


def checksum(obj) -> str:
    """sha256 of everything a checkpoint stores: tensors by dtype, shape and bytes, everything else as JSON."""
    h = hashlib.sha256()

    def add(x):
        if torch.is_tensor(x):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"{k!r}:".encode())
                add(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                add(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, default=repr).encode())
    add(obj)
    return h.hexdigest()


def atomic_write(path: str, write) -> None:
    """``write(f)`` into a temporary file, then rename it to ``path``: an interrupted or failed write leaves the
    old file (if any) untouched and no temporary file behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_ckpt(path: str, obj: dict) -> dict:
    """Save a checkpoint atomically, with the checksum of its contents; returns what was saved."""
    obj = {**obj, "checksum": checksum(obj)}
    atomic_write(path, lambda f: torch.save(obj, f))
    return obj


def load_ckpt(path: str, fp: str, log=None, tag: str = ""):
    """The checkpoint at ``path`` if its fingerprint is ``fp``, else None (logged, never used). A file that cannot
    be read, or whose contents do not match their checksum, stops the run with the fix."""
    if not os.path.exists(path):
        return None
    fix = "delete it (or choose another --out) to retrain that stage"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        stored = ck.pop("checksum") if isinstance(ck, dict) and "fingerprint" in ck else None
    except Exception as e:  # noqa: BLE001 -- any failure to read means the same thing to the user
        die(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:80]}); {fix}")
    if stored is None or stored != checksum(ck):
        die(f"checkpoint {path} is corrupt (its contents do not match their checksum); {fix}")
    if ck["fingerprint"] != fp:
        if log is not None:
            log(tag, f"{path} was made with other settings or code: retraining this stage")
        return None
    return {**ck, "checksum": stored}


def ckpt_path(args: Args, name: str) -> str:
    return os.path.join(args.out, f"{name}.pt")


def run_stage(args: Args, name: str, parent_sum: str, log: Logger, train) -> tuple:
    """<out>/<name>.pt if its fingerprint matches (same settings, code and parent), else the checkpoint dict
    that ``train()`` returns, saved. Returns (checkpoint, "reused" or "trained")."""
    path, fp, tag = ckpt_path(args, name), fingerprint(args, name, parent_sum), f"{CHECKPOINTS[name][0]} {name}"
    ck = load_ckpt(path, fp, log, tag)
    if ck is not None and ck.get("finished", True):         # (an unfinished pretraining resumes in pretrain())
        log(tag, f"reusing {path}")
        return ck, "reused"
    return save_ckpt(path, {**train(), "fingerprint": fp}), "trained"


def load_weights(model: nn.Module, state: dict, path: str) -> None:
    """load_state_dict, but a mismatch (a checkpoint from other code) names the file and the fix."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        die(f"checkpoint {path} does not fit this code's model ({str(e)[:80]}); delete it (or choose another "
            f"--out) to retrain that stage")


class Diverged(Exception):
    """A non-finite loss or gradient norm (check_finite); main() stops the run with its one-line message."""


def check_finite(tag: str, step: int, flag: str, args: Args, **values) -> None:
    """Stop training at the first non-finite value, naming the stage, the step and the likely fix."""
    for what, v in values.items():
        if not math.isfinite(v):
            raise Diverged(f"[{tag}] step {step}: the {what.replace('_', ' ')} is {v}, training diverged; try a "
                           f"smaller --{flag} (now {getattr(args, flag.replace('-', '_'))})")


def env_module(task: str):
    """The env file of a task: gridworld.py, or ant_tasks.py (imported only for the ant)."""
    if task == "grid":
        return gw
    import ant_tasks
    return ant_tasks


# ---------------------------------------------------------------------------------------------------
# 3. Data: expert trajectories D and D*, length-bucketed batches               [P App. C.1.1, C.4.4]
# D: expert trajectories on the 16 pretraining tasks (the expert may be epsilon-noisy); used to pretrain.
# D*: the same, always with epsilon = 0 ("more optimal"); used for controllers and the metacontroller,
#     which the paper finds need cleaner demonstrations than the base model does.
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
# (the next colour). Its expert runs MuJoCo at ~2,000 steps/s (the grid's ~200,000), so D is a stored set
# of --n-train successful episodes (the paper's D holds successful trajectories only), generated once by
# --workers processes (ant_tasks.generate_dataset), cached in the run folder (data.pt) and reused for
# epochs. D has a little action noise, D* none.

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
    if "e" in episodes[0]:                                  # residuals attached by with_residuals (section 10)
        b["e"] = nn.utils.rnn.pad_sequence([ep["e"] for ep in episodes], batch_first=True)     # (B, T, D)
    return b


def bucketed_batches(rng: np.random.Generator, draw, size: int, n_bucket: int, device):
    """Endless stream of length-bucketed batches of ``size`` episodes; ``draw(n)`` returns n episodes.

    ``n_bucket`` batches' worth are drawn at once, sorted by episode length and cut into batches, so each
    batch pads to a similar length (most padding disappears); the batch order is then shuffled."""
    while True:
        eps = sorted(draw(size * n_bucket), key=lambda ep: len(ep["actions"]))
        chunks = [eps[i:i + size] for i in range(0, len(eps), size)]
        for j in rng.permutation(len(chunks)):
            yield collate(chunks[j], device)


def sample_from(rng: np.random.Generator, episodes: list):
    """A ``draw`` for bucketed_batches: episodes of a stored set (e.g. D*), with replacement."""
    return lambda n: [episodes[i] for i in rng.integers(len(episodes), size=n)]


def batches_of(episodes: list, size: int, device):
    """Fixed-order, length-sorted batches of a stored set (for evaluation and feature extraction)."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i]["actions"]))
    for i in range(0, len(order), size):
        yield collate([episodes[j] for j in order[i:i + size]], device)


def ant_datasets(args: Args, log) -> dict:
    """The ant's stored sets D (train, held-out) and D* (train, held-out), kept in the checkpoint ``<out>/data.pt``,
    and the expert's success rates (pretraining tasks: the noise-free D* attempts; post-training: --expert-eval)."""
    ss = np.random.SeedSequence(args.seed).spawn(6)          # 0-3 the sets, 4 batches and eval seeds, 5 expert_post

    def generate() -> dict:
        spec = {"train": (args.n_train, args.action_noise, ss[0], False),          # name: (n, noise, seeds, post)
                "heldout": (args.n_heldout, args.action_noise, ss[1], False),
                "dstar_train": (args.n_dstar, 0.0, ss[2], False), "dstar_heldout": (args.n_dstar, 0.0, ss[3], False),
                "expert_post": (args.expert_eval, 0.0, ss[5], True)}          # attempts only: success rate
        try:
            sets, wins, tries = env_module("ant").generate_dataset(spec, args.workers, log=lambda msg: log("3 data", msg))
        except RuntimeError as e:
            die(str(e))
        expert = {"pretrain": (wins["dstar_train"] + wins["dstar_heldout"]) / (tries["dstar_train"] + tries["dstar_heldout"]),
                  "posttrain": wins["expert_post"] / tries["expert_post"]}
        del sets["expert_post"]
        # one tensor per field and set (episodes concatenated), so weights_only loading works
        return {"expert": expert, "sets": {name: {
            **{k: torch.from_numpy(np.concatenate([ep[k] for ep in eps])) for k in ("obs", "actions", "subgoals")},
            "lengths": torch.tensor([len(ep["actions"]) for ep in eps])} for name, eps in sets.items()}}

    ck, status = run_stage(args, "data", "", log, generate)
    out = {}
    for name, d in ck["sets"].items():                      # back to a list of episodes (numpy views)
        n = d["lengths"].tolist()
        parts = zip(d["obs"].split([k + 1 for k in n]), d["actions"].split(n), d["subgoals"].split(n))
        out[name] = [{"obs": o.numpy(), "actions": a.numpy(), "subgoals": g.numpy()} for o, a, g in parts]
    out["train_rng"] = np.random.default_rng(ss[4].spawn(1)[0])                 # batch sampling
    out["eval_seed"] = int(np.random.default_rng(ss[4]).integers(2 ** 31))      # env seeds for rollouts
    out.update(expert=ck["expert"], checksum=ck["checksum"], status=status)     # (main() chains the checksum)
    log("3 data", f"the expert (noise-free): success {ck['expert']['pretrain']:.3f} on pretraining tasks (D* attempts), "
        f"{ck['expert']['posttrain']:.3f} on the post-training task ({args.expert_eval} episodes)")
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
# Object attention (grid, --obj-attn, on in the top block by default; a deviation from the paper, whose blocks
# attend over time only).
# The input embedding *sums* the 12 object embeddings of a step, so to walk to one colour around the others
# the MLPs must pull "where is colour c" back out of that sum. In the blocks listed in --obj-attn, the token
# also attends over its own step's 12 objects, keys = values = the same E_obj[type, offset] rows the input
# summed, with a query from the residual stream: "look up the object I am heading for". It sees nothing
# beyond the current observation, no task and no label. Measured (README): at the same steps it lowers the
# held-out NLL and makes the residual stream far more steerable by the controllers of section 8.
#
#   Symbol      | Shape      | Meaning
#   obs         | (B, T, 13) | observations o_1..o_T in index form (section 3; the ant: (B, T, 41) floats)
#   e_{t,l}     | (B, T, D)  | residual after block l; l = 0 is the input embedding
#   act out     | (B, T, 4)  | logits of p(a_t | o_{1:t}) (the ant: the mean (B, T, 8) of a Gaussian)
#   obs out     | (B, T, 49) | logits of p(agent cell of o_{t+1} | o_{1:t}) (the ant: a prediction of o_{t+1})
def relative_buckets(n: int, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """T5-style causal bucketing of the distance d = t_query - t_key >= 0 (Table A16: 32 buckets).

    Distances below num_buckets/2 get their own bucket, larger ones share log-spaced buckets up to
    max_distance, and everything beyond shares the last bucket. There are no absolute positions: attention
    depends only on *how far back* a step is, so the post-training task's ~63-step episodes meet no position
    that ~31-step pretraining episodes lacked (though rarely trained distances: see the README)."""
    d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0)    # (n, n) query x key
    exact = num_buckets // 2
    log_b = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return torch.where(d < exact, d, log_b.clamp(max=num_buckets - 1))       # (n, n) bucket ids


class CausalSelfAttention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.n_head, D = args.n_head, args.n_embd
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)
        self.rel_bias = nn.Embedding(args.rel_buckets, args.n_head)            # one learned bias per bucket and head
        nn.init.zeros_(self.rel_bias.weight)                                    # 0 at first: plain causal attention

    def forward(self, x, buckets, cache=None):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (z.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hs)
        t0 = 0
        if cache is not None:                       # KV cache: write this call's keys/values after the past ones
            if "k" not in cache:                    # buffers for the longest episode (no O(T^2) re-copying)
                cache.update(k=k.new_zeros(B, self.n_head, len(buckets), D // self.n_head), t=0)
                cache["v"] = torch.zeros_like(cache["k"])
            t0 = cache["t"]
            cache["k"][:, :, t0:t0 + T], cache["v"][:, :, t0:t0 + T], cache["t"] = k, v, t0 + T
            k, v = cache["k"][:, :, :t0 + T], cache["v"][:, :, :t0 + T]                  # (B, H, t0+T, hs)
        S = k.shape[2]
        bias = self.rel_bias(buckets[t0:t0 + T, :S]).permute(2, 0, 1)                  # (H, T, S)
        future = torch.arange(S, device=x.device)[None, :] > torch.arange(t0, t0 + T, device=x.device)[:, None]
        bias = bias.masked_fill(future, float("-inf"))                                 # causal mask
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                # (B, H, T, hs)
        else:        # the same, spelled out: several times faster for one new step over a long cached past
            y = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias).softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))                         # (B, T, D)


class ObjectAttention(nn.Module):
    """Each step's token attends over that step's objects (keys = values = their embeddings); see above."""

    def __init__(self, args: Args):
        super().__init__()
        self.n_head = args.n_head
        self.q, self.proj = nn.Linear(args.n_embd, args.n_embd), nn.Linear(args.n_embd, args.n_embd)

    def forward(self, x, objs):
        B, T, O, D = objs.shape                                                  # objs (B, T, 12, D)
        q = self.q(x).view(B, T, 1, self.n_head, D // self.n_head)               # (B, T, 1, H, hs)
        kv = objs.view(B, T, O, self.n_head, D // self.n_head)                   # (B, T, 12, H, hs)
        w = ((q * kv).sum(-1) / math.sqrt(D // self.n_head)).softmax(2)          # (B, T, 12, H) over objects
        return self.proj((w[..., None] * kv).sum(2).reshape(B, T, D))            # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block [P D.1.1]: e <- e + Attn(LN(e)); [e <- e + ObjAttn(LN(e))]; e <- e + MLP(LN(e))."""

    def __init__(self, args: Args, objects: bool = False):
        super().__init__()
        D = args.n_embd
        self.ln_1, self.attn = nn.LayerNorm(D), CausalSelfAttention(args)
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, args.mlp_mult * D), nn.ReLU(), nn.Linear(args.mlp_mult * D, D))
        self.ln_o, self.obj_attn = (nn.LayerNorm(D), ObjectAttention(args)) if objects else (None, None)

    def forward(self, x, buckets, cache=None, objs=None):
        x = x + self.attn(self.ln_1(x), buckets, cache)                          # over time (causal)
        if self.obj_attn is not None:
            x = x + self.obj_attn(self.ln_o(x), objs)                            # over this step's objects
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
        objects = obj_attn_blocks(args)                                          # blocks with object attention
        self.blocks = nn.ModuleList([Block(args, l in objects) for l in range(1, args.n_layer + 1)])
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
        # GPT-2 init: N(0, 0.02) weights, zero biases; the relative-bias embeddings keep their zeros
        if args.task == "grid":
            nn.init.normal_(self.agent_emb.weight, std=0.02)
            nn.init.normal_(self.obj_emb.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for b in self.blocks:                   # GPT-2: scale residual-branch outputs by depth
            for lin in (b.attn.c_proj, b.mlp[2]) + (() if b.obj_attn is None else (b.obj_attn.proj,)):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * args.n_layer))

    def embed(self, obs):
        """obs (B, T, 13) -> e_{t,0} (B, T, D) and the object embeddings (B, T, 12, D) that it sums; the ant: a
        linear map of obs (B, T, 41), and no objects (None).

        Example: agent at cell 24 (row 3, col 3), colour 5 at cell 10 (row 1, col 3): offset (-2, 0), so
        colour 5 contributes E_obj[5, (-2 + 6) * 13 + (0 + 6)]. The same row serves every agent position,
        which is why "colour 5 is two cells up" is learned once, not 49 times as with a linear map of the
        flat one-hot. The grid's edges are not objects; E_agent[agent cell] tells where they are."""
        if self.task == "ant":
            return self.obs_emb(obs), None                                       # (B, T, D)
        agent = obs[..., -1]                                                     # (B, T)
        obj = obs[..., :-1]                                                      # (B, T, 12)
        dr = obj // gw.GRID - (agent // gw.GRID)[..., None] + gw.GRID - 1        # (B, T, 12) row offset in 0..12
        dc = obj % gw.GRID - (agent % gw.GRID)[..., None] + gw.GRID - 1          # (B, T, 12) col offset in 0..12
        objs = self.obj_emb(self.obj_type * N_OFFSETS + dr * (2 * gw.GRID - 1) + dc)   # (B, T, 12, D)
        return self.agent_emb(agent) + objs.sum(-2), objs                        # (B, T, D), (B, T, 12, D)

    def forward(self, obs, ctrl=None, ctrl_layer: int = -1, cache=None):
        """obs (B, T, 13) -> action logits (B, T, 4), next-cell logits (B, T, 49), residuals [L+1 x (B, T, D)].
        (The ant: obs (B, T, 41) -> action means (B, T, 8), next-observation predictions (B, T, 41), residuals.)

        ``cache``: a list with one dict per block (``new_cache()``); the call then continues the sequence
        it holds (rollouts feed one step at a time). ``residuals[l]`` is e_{t,l} as block l wrote it, before any
        controller at layer l; above a controlled layer the residuals carry the controller's effect."""
        x, objs = self.embed(obs)                                                # e_{t,0}   (B, T, D)
        residuals = [x]
        if ctrl is not None and ctrl_layer == 0:
            x = x + ctrl(x)                                                      # ALGO LOGIC: Eq. 1 at l = 0
        for l, block in enumerate(self.blocks, start=1):
            x = block(x, self.buckets, None if cache is None else cache[l - 1], objs)  # e_{t,l} (B, T, D)
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
    def lower(self, obs, layer: int):
        """obs (B, T, 13) -> e_{t,layer} (B, T, D): the embedding and blocks 1..layer."""
        x, objs = self.embed(obs)                                                # e_{t,0}   (B, T, D)
        for block in self.blocks[:layer]:
            x = block(x, self.buckets, None, objs)
        return x                                                                 # e_{t,layer} (B, T, D)

    def upper(self, x, layer: int, obs):
        """A (possibly controlled) residual at ``layer`` (B, T, D) -> action logits (B, T, 4): blocks layer+1..L.
        ``obs`` (B, T, 13) is read only by blocks with object attention."""
        objs = self.embed(obs)[1] if any(b.obj_attn is not None for b in self.blocks[layer:]) else None
        for block in self.blocks[layer:]:
            x = block(x, self.buckets, None, objs)
        return self.action_head(self.ln_f(x))                                    # (B, T, 4)


def masked_ce(logits, target):
    """Mean cross-entropy over non-padded steps (target -1 = padding)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1)


# ---------------------------------------------------------------------------------------------------
# 5. Rollouts: the frozen model (optionally controlled) acting in the env, with a KV cache
# Every evaluation in the paper rolls the model out in the env: at step t the model sees o_{1:t} (the
# whole history, exactly as in pretraining), its action head gives p(a_t | o_{1:t}), an action is
# sampled, and the env returns o_{t+1}. Re-running the whole prefix at every step would cost O(T^2)
# forwards per episode; instead each attention layer keeps the keys and values of the past steps (a KV
# cache) and each step only computes the new token. A test checks that stepping with the cache gives
# exactly the logits of one full forward. We run n envs side by side, one batched forward per step.
@torch.no_grad()
def rollout(model: GPT, task, n: int, seed: int, device, ctrl_fn=None, ctrl_layer: int = -1,
            greedy: bool = False, pretrain_tasks: bool = False, record: bool = False) -> dict:
    """n episodes in lock-step, one batched forward per env step; episode i uses env seed ``seed + i`` and,
    with ``pretrain_tasks``, the pretraining task i mod 16 (every task evaluated equally often).

    ``ctrl_fn(x, g)``: a controller applied at ``ctrl_layer``, given each episode's true subgoal g (n, 1).
    Returns ``success``, ``wrong_colour`` (the share that failed; on the ant every failure counts: a wrong
    colour, the wall cell, leaving the arena, falling; other non-successes timed out), ``colours`` (task
    colours visited) and ``length`` (means). With ``record``, for RL (section 9): ``obs`` (n, T, 13) the
    inputs o_1..o_T, ``actions`` (n, T), ``lengths`` (n,) and ``rewards`` (n,)."""
    # One env per episode, stepped in lock-step. We use the env classes directly (not gymnasium's vector
    # envs), so there is no autoreset: a finished episode simply stops being stepped.
    E = env_module(model.task)
    make = E.GridPinpadEnv if model.task == "grid" else E.AntPinpadEnv
    envs = [make(max_steps=E.MAX_STEPS) for _ in range(n)]          # (the limit is read here: tests shorten it)
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
    # Where episodes fail (diagnostics): how many task colours each unsuccessful episode reached, and for
    # those that entered a wrong colour, the subgoal it needed (row) x the subgoal of the colour it entered.
    out["fail_reached"] = np.bincount([env.progress for env in envs if not env.success],
                                      minlength=max(len(env.task) for env in envs) + 1).tolist()
    confusion = np.zeros((E.N_SUBGOALS, E.N_SUBGOALS), dtype=int)
    for env in envs:
        if env.failed and env.colour_here >= 0:
            confusion[E.subgoal_of(env.task[env.progress]), E.subgoal_of(env.colour_here)] += 1
    out["wrong_subgoal"] = confusion.tolist()
    out["subgoal_pass"] = subgoal_pass([env.task for env in envs], [env.progress for env in envs], E.subgoal_of)
    if record:
        out.update(obs=torch.stack(seen, 1), actions=torch.stack(taken, 1),                # (n, T, 13), (n, T)
                   lengths=torch.tensor(steps, device=device),                             # (n,)
                   rewards=torch.tensor([float(env.success) for env in envs], device=device))  # (n,)
    return out


def subgoal_pass(tasks: list, progress: list, subgoal_of) -> list:
    """Where tasks fail, subgoal by subgoal: entry k is the share of the episodes that completed subgoals
    1..k that also completed subgoal k+1 (a subgoal = a run of colours with the same subgoal id: a pair on
    the grid). The list stops after the first subgoal no episode reached; its product is the success rate."""
    done, n_sub = [], 0                                               # subgoals completed, per episode
    for task, p in zip(tasks, progress):
        ends = [i for i in range(1, len(task)) if subgoal_of(task[i]) != subgoal_of(task[i - 1])] + [len(task)]
        done.append(sum(p >= i for i in ends))
        n_sub = max(n_sub, len(ends))
    reached = [sum(d >= k for d in done) for k in range(n_sub + 1)]
    return [reached[k + 1] / reached[k] for k in range(n_sub) if reached[k]]


def rollout_pair(model: GPT, n: int, seed: int, device, **kw) -> tuple:
    """The fixed evaluation of sections 8 and 11: n episodes of the pretraining tasks (env seeds seed + i)
    and n of the post-training task (env seeds seed + 10**6 + i), with the same rollout() options."""
    post = env_module(model.task).POSTTRAIN_TASK
    return (rollout(model, None, n, seed, device, pretrain_tasks=True, **kw),
            rollout(model, post, n, seed + 10 ** 6, device, **kw))


# ---------------------------------------------------------------------------------------------------
# 6. Stage "pretrain": next-action prediction                                   [P Eq. 5, App. C.1]
# L(theta) = sum_t [ -ln p(a_t | o_{1:t}) - lambda ln p(o_{t+1} | o_{1:t}) ]                    (Eq. 5)
#
# Nothing here mentions subgoals: the data are expert trajectories on the 16 pretraining tasks, with no
# task label and no reward. To predict the expert's next move well, though, the model has to work out
# in context which colour the expert is heading for, and that depends on which colours it visited
# before (the pair rule: after colour 2k comes 2k+1; which pair comes next depends on the task). The
# paper's claim is that this latent "current subgoal" then sits linearly in the mid-depth residual stream
# (section 7) and can be steered (section 8).
#
# On a CPU the question is how fast that happens, so pretraining logs two diagnostics (PAPER.md 13): the
# pair-rule accuracies of action_metrics() and a quick probe at layer 0 vs. layer L/2 (always compare to
# layer 0: the agent-centred input gives it above-chance accuracy, as the agent is usually near its target).
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
    """Linear warm-up, constant (as Table A4), then an optional linear cool-down over the last ``cooldown``
    fraction of the steps; the last step (pretrain_steps - 1) uses 1 / (cooldown * pretrain_steps)."""
    cool = args.cooldown * args.pretrain_steps
    left = (args.pretrain_steps - step) / cool if cool > 0 else 1.0
    return min(1.0, (step + 1) / max(args.warmup, 1), left)


def pretrain(args: Args, data: dict, device, log: Logger) -> dict:
    """Train the base model from scratch on expert batches (grid: fresh ones; ant: from D).
    Returns the checkpoint: the weights ``model`` and the ``metrics``."""
    path, fp = ckpt_path(args, "pretrain"), fingerprint(args, "pretrain", data.get("checksum", ""))
    torch.manual_seed(args.seed)
    model = GPT(args).to(device)
    # weight decay on every weight except the ant's log std (decay would pull it towards std 1)
    decay = [p for name, p in model.named_parameters() if name != "log_std"]
    groups = [{"params": decay}] + ([{"params": [model.log_std], "weight_decay": 0.0}] if args.task == "ant" else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    rng, step, spent, curve = data["train_rng"], 0, 0.0, []
    # An interrupted run (same settings and code) resumes model, optimiser and data stream from its last
    # evaluation. (The data stream restarts at a fresh length bucket, so a resumed run is close to, not
    # bit-identical with, an uninterrupted one.)
    ck = load_ckpt(path, fp)
    if ck is not None:
        load_weights(model, ck.get("model", {}), path)
        opt.load_state_dict(ck["optim"])
        rng.bit_generator.state = json.loads(ck["rng"])
        step, spent, curve = ck["step"], ck["spent"], json.loads(ck["curve"])
        log("6 pretrain", f"resuming {path} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    if args.task == "grid":
        log("6 pretrain", f"{n_params / 1e6:.2f}M parameters, {args.pretrain_steps} steps of {args.batch_size} fresh episodes")
        draw = lambda n: generate_episodes(rng, n, gw.PRETRAIN_TASKS, args.epsilon)     # never reused
    else:                   # the ant: batches sampled from the stored set D
        log("6 pretrain", f"{n_params / 1e6:.2f}M parameters, {args.pretrain_steps} steps of {args.batch_size} episodes "
            f"sampled from {len(data['train'])} stored ones")
        draw = sample_from(rng, data["train"])
    stream = bucketed_batches(rng, draw, args.batch_size, args.bucket_batches, device)
    # t0 is shifted by the time already spent (a resumed run) and by evaluation pauses (as is t_log), so
    # the ETA, tok/s and train_time_s count training only.
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
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)   # rare spikes early in training
        check_finite("6 pretrain", step + 1, "lr", args, loss=loss.item(), gradient_norm=gnorm.item())
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
            pause = time.time() - te        # evaluation time does not count as training time
            t0, t_log = t0 + pause, t_log + pause
            save_ckpt(path, {"fingerprint": fp, "finished": False, "model": model.state_dict(),
                             "optim": opt.state_dict(), "rng": json.dumps(rng.bit_generator.state), "step": step,
                             "spent": time.time() - t0, "curve": json.dumps(curve)})
    m = action_metrics(model, data["heldout"], device)
    metrics = {"steps": step, "episodes": step * args.batch_size, "heldout_nll": m["nll"],
               **({"heldout_acc": m["acc"], "opt_acc_ambiguous": m["opt_acc_ambiguous"], "opt_acc_pair": m["opt_acc_pair"]}
                  if args.task == "grid" else {"heldout_mse": m["mse"]}),
               "train_time_s": time.time() - t0, "n_params": n_params, "curve": curve}
    return {"finished": True, "model": model.state_dict(), "metrics": metrics}


# ---------------------------------------------------------------------------------------------------
# 7. Stage "probe": linear probes of the current subgoal                 [P Sec. 5.1, Eq. 6-7, Fig. 3/A1]
# Is the current subgoal g_t (which colour pair the expert is working on) *linearly* readable from the
# residual e_{t,l}? For each layer l we fit p(g_t = g | e_{t,l}) = softmax(W_l e_{t,l} + b_l)_g (Eq. 6-7)
# on the frozen model's residuals of held-out D* episodes and score it on other episodes (split by
# episode: steps of one episode are strongly correlated, so a split by step would leak). The paper sees
# accuracy rise from ~0.3 at the input to ~0.5 around mid-depth (Fig. A1). The probe is the subgoal's
# identity (0..3), not its index within the task (a bug in one public re-implementation).
@torch.no_grad()
def residual_features(model: GPT, episodes: list, device) -> tuple:
    """Residuals of every real step at every layer and their subgoal labels: ([L+1 x (N, D)], (N,))."""
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
    probe = nn.Linear(x_tr.shape[1], int(max(y_tr.max(), y_te.max())) + 1).to(x_tr.device)  # one output per subgoal id
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
    """A probe at every layer 0..L; returns the checkpoint {"metrics"}."""
    t0 = time.time()
    acc = probe_all(model, data["dstar_heldout"][:args.n_probe], list(range(args.n_layer + 1)), device, args.probe_steps, args.probe_lr)
    for l, a in enumerate(acc):
        log("7 probe", f"layer {l}: held-out subgoal accuracy {a:.3f} (chance 0.25)")
    mid = args.n_layer // 2
    log("7 probe", f"gap layer {mid} - layer 0 = {acc[mid] - acc[0]:+.3f} ({time.time() - t0:.0f}s)")
    metrics = {"probe_accuracy": acc, "probe_gap_mid": acc[mid] - acc[0], "train_time_s": time.time() - t0}
    return {"metrics": metrics}


# ---------------------------------------------------------------------------------------------------
# 8. Stage "controllers": ground-truth residual-stream controllers        [P Eq. 1, Sec. 5.2, Fig. 4, Table A7]
# Probing says the information is there; control asks whether the model *uses* it. Eq. 1 inserts a
# linear controller into the residual stream at layer l:
#
#     e_{t,l} <- e_{t,l} + U_t e_{t,l}                                                           (Eq. 1)
#
# and blocks l+1..L process the edited stream as if nothing happened. There is one controller per
# subgoal g, low-rank as in LoRA: U^(g) = A_g B_g^T with A_g, B_g in R^{D x r} (r = 16; the ant: full
# rank, Table A8). The ground-truth subgoal g_t picks U_t = U^(g_t) at every step. If the residual stream
# encodes the subgoal linearly, such a U can *steer* the frozen model toward it, and switching controllers
# in the right order should solve subgoal orders never seen in pretraining (the post-training task).
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
        check_finite("8 controllers", step, "ctrl-lr", args, loss=loss.item())
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
    task it essentially never succeeds. Controllers that steer should lift the first well above that.
    Returns the checkpoint: the ``metrics`` and the ``controllers`` of every layer."""
    t0, post_task = time.time(), env_module(args.task).POSTTRAIN_TASK
    ev = dict(n=args.n_eval, seed=data["eval_seed"], device=device, greedy=args.greedy)
    base_pre, base_post = rollout_pair(model, **ev)
    log("8 controllers", f"base model alone: success pretraining tasks {base_pre['success']:.3f}, "
        f"post-training task {base_post['success']:.3f} ({base_post['colours']:.1f} of {len(post_task)} colours)")
    layers = ctrl_layers(args)
    per_layer, states = {}, {}
    for layer in layers:
        ctrl = train_controllers(args, model, layer, data["dstar_train"], device, log)
        nll = controlled_nll(model, ctrl, layer, data["dstar_heldout"][:args.n_probe // 2], device)
        pre, post = rollout_pair(model, ctrl_fn=ctrl, ctrl_layer=layer, **ev)
        per_layer[layer] = {"nll": nll, "pretrain": pre, "posttrain": post}
        if layer == args.n_layer // 2:            # diagnostic: where the post-training episodes fail
            top = sorted(((n, i, j) for i, row in enumerate(post["wrong_subgoal"]) for j, n in enumerate(row) if n),
                         reverse=True)[:4]
            log("8 controllers", f"layer {layer}, post-training task: unsuccessful episodes by task colours reached "
                f"(0..{len(post_task)}) {post['fail_reached']} | wrong colour entered, subgoal needed -> entered: "
                + ", ".join(f"{i}->{j} x{n}" for n, i, j in top) + " | completed subgoal k, of the episodes that "
                f"reached it: {' '.join(f'{p:.2f}' for p in post['subgoal_pass'])} (pretraining tasks: "
                f"{' '.join(f'{p:.2f}' for p in pre['subgoal_pass'])})", subgoal_pass=post["subgoal_pass"],
                subgoal_pass_pretrain=pre["subgoal_pass"])
        states[str(layer)] = ctrl.state_dict()
        log("8 controllers", f"layer {layer}: held-out D* nll {nll:.3f} | success pretraining tasks "
            f"{pre['success']:.3f} (failed {pre['wrong_colour']:.2f}) | post-training task {post['success']:.3f} "
            f"({post['colours']:.1f} of {len(post_task)} colours, failed {post['wrong_colour']:.2f}) "
            f"| {eta(t0, layers.index(layer) + 1, len(layers))}", layer=layer, pretrain=pre["success"],
            posttrain=post["success"])
    # Diagnostic (grid; not the paper's protocol, which trains on D* only): controllers at L/2 trained on D*
    # plus as many expert episodes of the post-training task itself. If these steer the novel order and the D*
    # controllers do not, the base model *can* be steered there by a linear edit at L/2, and what fails is the
    # D* controllers' transfer: D* never shows a subgoal that the history rules out (README "What mattered").
    oracle = {}
    if args.ctrl_oracle and args.task == "grid" and args.n_layer // 2 in per_layer:
        mid, n = args.n_layer // 2, args.n_dstar // 2
        rng = np.random.default_rng(np.random.SeedSequence(args.seed).spawn(6)[5])   # a stream no other set uses
        mixed = [ep for pair in zip(data["dstar_train"][:n], generate_episodes(rng, n, [post_task], 0.0)) for ep in pair]
        torch.manual_seed(args.seed + 5)
        ctrl = train_controllers(args, model, mid, mixed, device, log)
        o_pre, o_post = rollout_pair(model, ctrl_fn=ctrl, ctrl_layer=mid, **ev)
        oracle = {"controller_success_oracle": o_post["success"], "controller_success_oracle_pretrain": o_pre["success"]}
        log("8 controllers", f"layer {mid}, diagnostic: controllers trained on D* + post-training expert episodes "
            f"(not the protocol): success pretraining tasks {o_pre['success']:.3f} | post-training task "
            f"{o_post['success']:.3f}, completed subgoal k: {' '.join(f'{p:.2f}' for p in o_post['subgoal_pass'])} "
            f"(D* controllers: {per_layer[mid]['posttrain']['success']:.3f})", **oracle)
    by_layer = lambda f: [f(per_layer[l]) if l in per_layer else None for l in range(args.n_layer + 1)]
    metrics = {
        "base_success": base_post["success"], "base_success_pretrain": base_pre["success"],
        "base_nll": controlled_nll(model, None, -1, data["dstar_heldout"][:args.n_probe // 2], device),
        "controller_success": by_layer(lambda r: r["posttrain"]["success"]),
        "controller_success_pretrain": by_layer(lambda r: r["pretrain"]["success"]),
        "controller_colours": by_layer(lambda r: r["posttrain"]["colours"]),
        "controller_nll": by_layer(lambda r: r["nll"]),
        "controller_rollouts": {str(l): v for l, v in per_layer.items()},
        "base_rollouts": {"pretrain": base_pre, "posttrain": base_post},
        "eval_episodes": args.n_eval, "eval_greedy": args.greedy, "train_time_s": time.time() - t0, **oracle,
    }
    return {"metrics": metrics, "controllers": states}


# ---------------------------------------------------------------------------------------------------
# 9. The RL toolkit and token-level RL                                    [P Sec. 8.3-8.4, App. C.5.2]
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
    act_out, _, _ = model(obs)                                                     # (B, T, 4) or (B, T, 8)
    return model.action_logp(act_out, actions)                                     # (B, T)


def rl_train(args: Args, tag: str, collect, logp_fn, params, lr_flag: str, seed: int, log: Logger) -> dict:
    """The shared RL loop (Alg. 3): collect B episodes with the current policy, one advantage per episode,
    ``rl_epochs`` full-batch steps on the clipped objective; until ``rl_episodes`` episodes are used. The
    learning rate is the setting ``lr_flag`` (token-lr or irl-lr).

    ``collect(n, seed)`` -> batch dict with ``rewards`` (B,), ``mask`` (B, T') and whatever ``logp_fn``
    needs; ``logp_fn(batch)`` -> (B, T') log-probabilities of the batch's actions under the current policy.
    Returns the learning curve: [episodes so far, success rate of that batch] per batch."""
    lr = getattr(args, lr_flag.replace("-", "_"))
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
                gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                check_finite(tag, it, lr_flag, args, loss=loss.item(), gradient_norm=gnorm.item())
                opt.step()
        if it % max(1, n_batches // 12) == 0 or it == n_batches:
            recent = np.mean([c[1] for c in curve[-max(1, n_batches // 12):]])
            log(tag, f"episodes {episodes}/{n_batches * args.rl_batch} | batch success {R.mean():.3f} "
                f"(recent mean {recent:.3f}) | {eta(t0, it, n_batches)}", episodes=episodes, success=float(R.mean()))
    return {"curve": curve, "episodes": episodes, "train_time_s": time.time() - t0}


def rl_report(args: Args, name: str, m: dict, test: dict, data: dict, log: Logger, t0: float) -> dict:
    """The final test's numbers, logged and added to the training metrics ``m`` of RL method ``name``."""
    m.update(success=test["success"], colours=test["colours"], wrong_colour=test["wrong_colour"],
             train_time_s=time.time() - t0)
    if "expert" in data:             # the ant: relative to the expert, as the paper's Fig. 8 does
        m["success_normalised"] = test["success"] / max(data["expert"]["posttrain"], 1e-9)
    log(f"{CHECKPOINTS[name][0]} {name}", f"final test on {args.rl_eval} post-training episodes (unseen env seeds): "
        f"success {test['success']:.3f} | {test['colours']:.1f} of {len(env_module(args.task).POSTTRAIN_TASK)} "
        f"colours | trained on {m['episodes']} episodes in {m['train_time_s']:.0f}s", success=test["success"])
    return m


def token_rl(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """Token-level RL: finetune a copy of the pretrained base model on primitive actions (Sec. 8.4), then
    test it on unseen env seeds. Returns the checkpoint: the ``metrics`` and the finetuned ``policy``."""
    t0, post = time.time(), env_module(args.task).POSTTRAIN_TASK
    policy = copy.deepcopy(model).requires_grad_(True)     # the frozen original stays untouched

    def collect(n, s):
        r = rollout(policy, post, n, s, device, record=True)
        return {"rewards": r["rewards"], "obs": r["obs"], "actions": r["actions"],
                "mask": step_mask(r["lengths"], r["actions"].shape[1])}

    logp_fn = lambda b: token_logp(policy, b["obs"], b["actions"])             # ALGO LOGIC: act = a_t, every step
    m = rl_train(args, "9 token_rl", collect, logp_fn, list(policy.parameters()), "token-lr",
                 data["eval_seed"] + 3 * 10 ** 6, log)
    test = rollout(policy, post, args.rl_eval, data["eval_seed"] + 2 * 10 ** 6, device)    # env seeds unused so far
    return {"metrics": rl_report(args, "token_rl", m, test, data, log, t0), "policy": policy.state_dict()}


# ---------------------------------------------------------------------------------------------------
# 10. The metacontroller: discovering subgoals and when to switch      [P Sec. 6, Eq. 2-3, App. D.2, Table A9]
# Section 8 needed the true subgoal labels. The metacontroller finds controllers *and* their timing
# without labels, self-supervised on D*, reading the frozen model's residual e_t = e_{t,L/2} and writing
# a controller back at the same layer:
#
#   s     = f_emb(e_{1:T})                           non-causal sequence embedding (sees the future) Eq. 13
#   h_t   = GRU(e_t, h_{t-1})                        history                                         Eq. 12
#   mu_t, Sigma_t = f_enc(e_t, h_{t-1}, s);  z~_t ~ N(mu_t, Sigma_t)    proposal for a new code      Eq. 14-15
#   beta_t = f_switch(e_t, h_{t-1}, z_{t-1}) in [0, 1]     causal switching unit (no s: usable at test time) Eq. 16
#   z_t   = beta_t z~_t + (1 - beta_t) z_{t-1}      temporal integration                             Eq. 2
#   U_t   = f_hyp(z_t) = A(z_t) B(z_t)^T            hypernetwork decoder, rank r (16; ant: D)        Eq. 18
#   e_t  <- e_t + U_t e_t                           then the frozen upper blocks predict a_t        Eq. 11
#
# Loss (Eq. 3 with lambda = 0): sum_t [ -ln p(a_t | o_{1:t}, z_{1:t}) + alpha KL(N(mu_t, Sigma_t) || N(0, I)) ].
# The KL is charged at *every* step, not weighted by beta (App. E.1 shows the relaxed per-step KL is this
# whatever beta is; weighting by beta is a bug one re-implementation shipped). Switching comes out sparse
# because a proposal that beta ignores can sit at the prior for free: one code per subgoal, sent at its start,
# buys the subgoal's NLL for a few nats, a rate-distortion trade-off set by alpha (Fig. 7; README).
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
        D, Z, H, E, r = args.n_embd, args.n_z, args.mc_hidden, args.mc_enc_hidden, args.ctrl_rank or args.n_embd
        self.D, self.r, self.Z, self.gumbel = D, r, Z, args.mc_gumbel
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
        """U(z_t) e_t at every step: apply_controller(e, *self.factors(z)) without forming a (B, T, 2 D r) tensor.

        A and Bm are linear in the decoder's hidden layer h (A[d,i] = sum_j Wa[d,i,j] h_j + ba[d,i]), so Bm^T e
        and A (Bm^T e) become ordinary matmuls: the same numbers (a test checks), several times faster."""
        D, r = self.D, self.r
        h = self.decoder[1](self.decoder[0](z))                                          # (B, T, H)
        W, b = self.decoder[2].weight, self.decoder[2].bias                              # (2 D r, H), (2 D r,)
        Wa, Wb = W.view(2, D * r, -1).unbind(0)                                          # (D r, H) each
        ba, bb = b.view(2, D, r).unbind(0)                                               # (D, r) each
        P = (e @ Wb.view(D, -1)).unflatten(-1, (r, h.shape[-1]))                         # (B, T, r, H)
        coef = (P * h[..., None, :]).sum(-1) + e @ bb                                    # Bm(z)^T e    (B, T, r)
        outer = (coef[..., :, None] * h[..., None, :]).flatten(-2)                       # (B, T, r H)
        return outer @ Wa.view(D, -1).T + coef @ ba.T                                    # A(z) Bm(z)^T e  (B, T, D)

    def switch_input(self, e, h_prev):
        """The switching unit's first layer on (e_t, h_{t-1}) alone, for any leading shape. The layer is linear,
        so forward() computes this part for every step at once and only the z_{t-1} part waits for the loop."""
        first = self.switch[0]
        return F.linear(torch.cat([e, h_prev], -1), first.weight[:, :-self.Z], first.bias)

    def switch_prob(self, pre, z_prev, noisy: bool = False):
        """beta_t = f_switch(e_t, h_{t-1}, z_{t-1}) (Eq. 16): causal, no access to s. (B, E), (B, Z) -> (B,)

        ``pre`` = switch_input(e_t, h_{t-1}).
        ``noisy`` (training with --mc-gumbel > 0): a Gumbel-sigmoid sample, sigmoid((logit + logistic noise) / tau),
        which makes in-between values of beta noisy and so pushes the gate towards 0 or 1."""
        W_z = self.switch[0].weight[:, -self.Z:]                                         # (E, Z)
        logit = self.switch[2](torch.relu(pre + z_prev @ W_z.T))[..., 0]                 # (B,)
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
        if forced:                          # ALGO LOGIC: Eq. 2 with beta = 1 (the ablation): z_t = z~_t
            return z_tilde, kl, e.new_ones(B, T)
        pre = self.switch_input(e, h_prev)                                               # (B, T, E)
        z, zs, betas = e.new_zeros(B, mu.shape[-1]), [], []
        # the only sequential part: beta_t reads z_{t-1}. (unbind() slices once; indexing [:, t] inside the
        # loop would make autograd build a full-size zero tensor per step, O(T^2).)
        pre_t, zt_t = pre.unbind(1), z_tilde.unbind(1)
        for t in range(T):
            if t == 0:
                beta = e.new_ones(B)                                                     # (B,)
            else:
                beta = self.switch_prob(pre_t[t], z, noisy=sample)                     # (B,)
            z = beta[:, None] * zt_t[t] + (1 - beta[:, None]) * z                      # ALGO LOGIC: Eq. 2 (B, Z)
            zs.append(z)
            betas.append(beta)
        return torch.stack(zs, 1), kl, torch.stack(betas, 1)                            # (B, T, Z), (B, T), (B, T)


@torch.no_grad()
def with_residuals(model: GPT, episodes: list, layer: int, device) -> list:
    """The episodes with e_{t,layer} of the frozen model attached (key "e", (T, D) each). A controller at
    ``layer`` never changes e_{t,layer} itself, and the base model never trains, so the metacontroller's
    input can be computed once per episode instead of once per batch (~11% of a training step)."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i]["actions"]))
    out = [None] * len(episodes)
    for k in range(0, len(order), 256):
        idx = order[k:k + 256]
        e = model.lower(collate([episodes[i] for i in idx], device)["obs"], layer)     # (B, T, D)
        for j, i in enumerate(idx):
            out[i] = {**episodes[i], "e": e[j, :len(episodes[i]["actions"])]}
    return out


def mc_loss(model: GPT, mc: MetaController, b: dict, layer: int, alpha: float, forced: bool = False):
    """Eq. 3 with lambda = 0 on a D* batch: action NLL through the frozen model + alpha * mean per-step KL.
    The batch's e_{t,layer} comes with it (with_residuals) or is computed here."""
    if "e" in b:
        e = b["e"]                                                                       # (B, T, D)
    else:
        with torch.no_grad():
            e = model.lower(b["obs"], layer)                 # (B, T, D) the controller never changes e_{t,l}
    lengths = b["mask"].sum(1)                                                           # (B,)
    z, kl, beta = mc(e, lengths, forced)
    act_out = model.upper(e + mc.apply(z, e), layer, b["obs"])                           # ALGO LOGIC: Eq. 11, (B, T, 4)
    nll = model.action_nll(act_out, b["actions"], b["mask"])
    mask = step_mask(lengths, e.shape[1])                                                # (B, T)
    kl_mean = (kl * mask).sum() / mask.sum()
    return nll + alpha * kl_mean, nll, kl_mean, beta, mask                              # ALGO LOGIC: Eq. 3


def boundary_f1(beta, subgoals, lengths, tol: int = 1) -> dict:
    """Switches (beta >= 0.5) against ground-truth subgoal changes, per episode, matched within +-tol steps.

    beta, subgoals: (B, T) tensors or per-episode lists; lengths (B,). The first step never counts (every
    episode starts with a code). A predicted switch matches at most one true boundary and vice versa
    (greedy, in time order). Returns precision, recall, F1, switch rate, and the recall of an episode's
    k-th boundary for each k (``recall_by_boundary``: does it find every boundary, or only some?)."""
    tp = n_pred = n_true = n_steps = 0
    hits, counts = [], []                                   # per boundary index k: matched, present
    for bt, g, n in zip(*(x.tolist() if torch.is_tensor(x) else x for x in (beta, subgoals, lengths))):
        pred = [t for t in range(1, n) if bt[t] >= 0.5]
        true = [t for t in range(1, n) if g[t] != g[t - 1]]
        used = set()
        for k, t in enumerate(true):
            best = min((p for p in pred if abs(p - t) <= tol and p not in used), key=lambda p: abs(p - t), default=None)
            if k == len(counts):
                hits.append(0)
                counts.append(0)
            counts[k] += 1
            if best is not None:
                used.add(best)
                tp += 1
                hits[k] += 1
        n_pred, n_true, n_steps = n_pred + len(pred), n_true + len(true), n_steps + max(n - 1, 0)
    prec, rec = tp / max(n_pred, 1), tp / max(n_true, 1)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-9),
            "switch_rate": n_pred / max(n_steps, 1), "recall_by_boundary": [h / c for h, c in zip(hits, counts)]}


def first_colour_segments(next_colour: list) -> list:
    """Grid diagnostic: a label per step that changes exactly where the agent reaches the *first* colour of a
    pair (next colour 2k -> 2k+1), the event half a subgoal before the labelled boundary. boundary_f1 against
    it says whether a metacontroller found that event instead of the subgoals (README)."""
    seg = [0]
    for prev, nxt in zip(next_colour, next_colour[1:]):
        seg.append(seg[-1] + int(prev % 2 == 0 and nxt == prev + 1))
    return seg


@torch.no_grad()
def switch_alignment(model: GPT, mc: MetaController, episodes: list, layer: int, device) -> dict:
    """Held-out switch statistics (posterior means, no sampling), plus NLL, KL and a beta histogram."""
    betas, subgoals, firsts, nll, kl, n = [], [], [], 0.0, 0.0, 0      # per episode, real steps only
    for b in batches_of(episodes, 256, device):
        e = model.lower(b["obs"], layer)
        m = b["mask"]
        lengths = m.sum(1)
        z, k, beta = mc(e, lengths, sample=False)
        nll -= model.action_logp(model.upper(e + mc.apply(z, e), layer, b["obs"]), b["actions"])[m].sum().item()
        kl += k[m].sum().item()
        n += int(m.sum())
        nxt = b["next_colour"].tolist() if "next_colour" in b else None                 # the grid only
        for i, (bt, g, T) in enumerate(zip(beta.tolist(), b["subgoals"].tolist(), lengths.tolist())):
            betas.append(bt[:T])
            subgoals.append(g[:T])
            if nxt is not None:
                firsts.append(first_colour_segments(nxt[i][:T]))
    out = boundary_f1(betas, subgoals, [len(bt) for bt in betas])
    if firsts:                                              # the grid: the same switches against first-colour visits
        out["f1_first_colour"] = boundary_f1(betas, firsts, [len(bt) for bt in betas])["f1"]
    later = torch.tensor([x for bt in betas for x in bt[1:]])               # beta_2..beta_T (beta_1 = 1 always)
    out.update(nll=nll / n, kl=kl / n, beta_hist=torch.histc(later, bins=10, min=0, max=1).int().tolist(),
               examples=[{"beta": [round(x, 3) for x in betas[i]], "subgoals": subgoals[i]}
                         for i in range(0, len(betas), max(1, len(betas) // 6))][:6])   # for the Fig. 6/A3 plot
    return out


def collapse_verdict(rate: float, kl: float) -> str:
    """Switching in plain words (PAPER.md 12, pitfall 10), from the held-out switch rate and KL per step."""
    if kl < 0.005:
        return "COLLAPSED: it sends nothing (KL ~ 0: a collapsed posterior), so its codes carry no information"
    if rate < 0.01:
        return "COLLAPSED: it never switches after the first step"
    return "COLLAPSED: it switches at (almost) every step" if rate > 0.9 else "sparse switching"


def train_metacontroller(args: Args, model: GPT, data: dict, device, log: Logger, forced: bool, tag: str,
                         seed: int, until: int = 0, run: dict = None) -> dict:
    """Minimise Eq. 3 on D* with the base model frozen; only the metacontroller's parameters train.

    Trains up to step ``until`` (default: --mc-steps) and returns the run, a dict with the metacontroller
    ``mc``, its optimiser, batch stream and ``step``; pass it back as ``run`` to continue where it stopped
    (the metacontroller stage screens several seeds that way, section 10's --mc-screen)."""
    model.requires_grad_(False).eval()       # the base model is frozen: gradients reach only the metacontroller
    if run is None:
        torch.manual_seed(seed + (7 if forced else 0))
        mc = MetaController(args).to(device)
        opt = torch.optim.AdamW(mc.parameters(), lr=args.mc_lr, weight_decay=args.weight_decay)
        rng = np.random.default_rng(seed + (300 if forced else 200))
        episodes = data["dstar_train"]
        if "e" not in episodes[0]:                  # (the metacontroller stage attaches them once for all seeds)
            episodes = with_residuals(model, episodes, args.n_layer // 2, device)
        stream = bucketed_batches(rng, sample_from(rng, episodes), args.mc_batch, args.bucket_batches, device)
        run = {"mc": mc, "opt": opt, "stream": stream, "step": 0, "seed": seed}
    mc, opt, mid, t0, start = run["mc"], run["opt"], args.n_layer // 2, time.time(), run["step"]
    until = until or args.mc_steps
    for step in range(start + 1, until + 1):
        b = next(run["stream"])
        # KL warm-up: with the full alpha from step 1 the encoder learns to send nothing (KL -> 0, a collapsed
        # posterior) before the decoder has learned to use anything; ramping alpha avoids that.
        alpha = args.alpha * min(1.0, step / max(1.0, args.mc_kl_warmup * args.mc_steps))
        loss, nll, kl, beta, mask = mc_loss(model, mc, b, mid, alpha, forced)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(mc.parameters(), args.grad_clip)
        check_finite(f"10 {tag}", step, "mc-lr", args, loss=loss.item(), gradient_norm=gnorm.item())
        opt.step()
        if step % args.log_every == 0 or step == until:
            rate = float(((beta >= 0.5).float() * mask)[:, 1:].sum() / mask[:, 1:].sum())
            log(f"10 {tag}", f"seed {seed} step {step}/{args.mc_steps} | nll {nll.item():.3f} | kl {kl.item():.3f} | "
                f"switch rate {rate:.3f} | {eta(t0, step - start, until - start)}", seed=seed, step=step, nll=nll.item(),
                kl=kl.item(), switch_rate=rate)
    run["step"] = until
    return run


def metacontroller_stage(args: Args, model: GPT, data: dict, device, log: Logger):
    """Train the metacontroller and its forced-switching ablation; measure switch alignment on held-out D*.

    With --mc-seeds N, N metacontrollers train from different seeds and the one with the lowest Eq. 3 on
    held-out D*[n_probe/2:n_probe] is kept: a choice without labels, on episodes that the switch alignment
    (D*[:n_probe/2]) does not score. Seeds matter: with the same settings some send nothing, some the whole
    task in the first code, and some switch at every subgoal boundary, which also gives the lowest Eq. 3,
    already at 1,000 steps (README). So the grid preset screens six seeds for mc_screen = 1/3 of
    mc_steps = 3,000 and trains the kept one on. The forced ablation trains once.
    Returns the checkpoint: the ``metrics`` and the weights of both metacontrollers, ``mc`` and ``mc_forced``."""
    mcs, t0, mid = {}, time.time(), args.n_layer // 2
    data = {**data, "dstar_train": with_residuals(model, data["dstar_train"], mid, device)}   # once, for every seed
    # Screening: every seed trains to step `screen` (all of --mc-steps unless --mc-screen < 1); the one with
    # the lowest held-out Eq. 3 there is kept and, if it stopped early, continues to --mc-steps.
    screen = max(1, round(args.mc_screen * args.mc_steps)) if args.mc_seeds > 1 else args.mc_steps
    candidates = []                              # (held-out Eq. 3, seed, run, its held-out stats)
    for i in range(args.mc_seeds):
        seed = args.seed + 1000 * i
        run = train_metacontroller(args, model, data, device, log, forced=False, tag="metacontroller", seed=seed,
                                   until=screen)
        if args.mc_seeds > 1:                                # ALGO LOGIC: keep the lowest held-out Eq. 3
            sel = switch_alignment(model, run["mc"], data["dstar_heldout"][args.n_probe // 2:args.n_probe], mid, device)
            candidates.append((sel["nll"] + args.alpha * sel["kl"], seed, run, sel))
            log("10 metacontroller", f"seed {seed} ({i + 1} of {args.mc_seeds}) at step {screen}: held-out Eq. 3 "
                f"{candidates[-1][0]:.4f} (nll {sel['nll']:.3f} + alpha * kl {sel['kl']:.3f}) | switch rate "
                f"{sel['switch_rate']:.3f} | F1 {sel['f1']:.3f} (labels: logged, not used to choose) | "
                f"{eta(t0, i + 1, args.mc_seeds)}", seed=seed, eq3=candidates[-1][0], f1=sel["f1"],
                switch_rate=sel["switch_rate"])
        else:
            candidates.append((0.0, seed, run, {}))
    eq3, chosen, run, _ = min(candidates, key=lambda c: c[0])
    if args.mc_seeds > 1:
        log("10 metacontroller", f"kept seed {chosen} (lowest held-out Eq. 3, {eq3:.4f})" +
            (f"; training it on to step {args.mc_steps}" if screen < args.mc_steps else ""))
    mcs["mc"] = train_metacontroller(args, model, data, device, log, forced=False, tag="metacontroller", seed=chosen,
                                     run=run)["mc"]
    al = switch_alignment(model, mcs["mc"], data["dstar_heldout"][:args.n_probe // 2], mid, device)
    rate = al["switch_rate"]
    verdict = collapse_verdict(rate, al["kl"])
    log("10 metacontroller", f"held-out D*: nll {al['nll']:.3f} | kl {al['kl']:.3f} | switch rate {rate:.3f} ({verdict}) | "
        f"switches vs subgoal boundaries (+-1 step): precision {al['precision']:.3f} recall {al['recall']:.3f} "
        f"(an episode's 1st, 2nd, ... boundary: {' '.join(f'{r:.2f}' for r in al['recall_by_boundary'])}) "
        f"F1 {al['f1']:.3f}" + (f" (against first-colour visits, half a subgoal early: F1 {al['f1_first_colour']:.3f})"
        if "f1_first_colour" in al else "") + f" | beta histogram (0..1, 10 bins) {al['beta_hist']}", **al)
    mcs["mc_forced"] = train_metacontroller(args, model, data, device, log, forced=True, tag="metacontroller-forced",
                                            seed=args.seed)["mc"]
    forced_nll = switch_alignment(model, mcs["mc_forced"], data["dstar_heldout"][:args.n_probe // 2], mid, device)["nll"]
    log("10 metacontroller-forced", f"held-out D* nll {forced_nll:.3f} (beta = 1 at every step)")
    metrics = {"switch_f1": al["f1"], "switch_precision": al["precision"], "switch_recall": al["recall"],
               "switch_recall_by_boundary": al["recall_by_boundary"], "switch_rate": rate,
               "switch_f1_first_colour": al.get("f1_first_colour"),                                 # None on the ant
               "switch_collapse": verdict, "mc_nll": al["nll"], "mc_kl": al["kl"],
               "beta_hist": al["beta_hist"], "beta_examples": al["examples"], "mc_forced_nll": forced_nll,
               "mc_seed": chosen, "mc_screen_steps": screen,
               "mc_candidates": [{"seed": s, "eq3": e, "f1": c["f1"], "switch_rate": c["switch_rate"]}
                                 for e, s, _, c in candidates if c], "train_time_s": time.time() - t0}
    return {"metrics": metrics, **{k: m.state_dict() for k, m in mcs.items()}}


# ---------------------------------------------------------------------------------------------------
# 11. Internal RL: RL in the metacontroller's code space                 [P Sec. 8.1-8.2, Alg. 1-3, App. D.3]
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
            beta = self.mc.switch_prob(self.mc.switch_input(e, self.h), self.z)         # (n,) Eq. 16
            decide = beta >= 0.5                                                         # ALGO LOGIC: Heaviside(beta - 0.5)
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
        return self.mc.apply(self.z[:, None], x)                                        # U_t e_t (n, 1, D)

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


def internal_rl(args: Args, model: GPT, mc: MetaController, data: dict, device, log: Logger, forced: bool) -> dict:
    """Internal RL (Alg. 3): section 9's loop, but the actions are codes z at switch points; then the test on
    unseen env seeds. ``forced``: the beta = 1 ablation. Returns the checkpoint: ``metrics`` and the ``policy``."""
    name, t0 = "internal_rl_no_temporal" if forced else "internal_rl", time.time()
    model.requires_grad_(False)
    mc.requires_grad_(False)                                   # base, switch, decoder, history: all frozen
    torch.manual_seed(args.seed + (11 if forced else 10))
    policy = ZPolicy(args).to(device)                          # the only trainable part
    mid, post = args.n_layer // 2, env_module(args.task).POSTTRAIN_TASK

    def collect(n, s):
        agent = InternalAgent(mc, policy, n, s + 1, forced)
        r = rollout(model, post, n, s, device, ctrl_fn=agent, ctrl_layer=mid, record=True)
        e_dec, z_dec, mask = agent.decisions(r["lengths"])                              # ALGO LOGIC: act = z at switches
        return {"rewards": r["rewards"], "e": e_dec, "z": z_dec, "mask": mask}

    logp_fn = lambda b: policy.log_prob(b["e"], b["z"])                                  # ALGO LOGIC: log pi(z | e)
    m = rl_train(args, f"11 {name}", collect, logp_fn, list(policy.parameters()), "irl-lr",
                 data["eval_seed"] + 3 * 10 ** 6, log)
    test_seed = data["eval_seed"] + 2 * 10 ** 6                                         # env seeds unused so far
    agent = InternalAgent(mc, policy, args.rl_eval, test_seed + 1, forced)
    test = rollout(model, post, args.rl_eval, test_seed, device, ctrl_fn=agent, ctrl_layer=mid, record=True)
    m["decisions_per_episode"] = float(agent.decisions(test["lengths"])[2].sum(1).mean())
    return {"metrics": rl_report(args, name, m, test, data, log, t0), "policy": policy.state_dict()}


# ---------------------------------------------------------------------------------------------------
# 12. Figures
def make_figures(args: Args, results: dict) -> list:
    """PNG figures in the run folder: the env, pretraining diagnostics, probe accuracy by layer (Fig. A1),
    controller success by layer (Fig. 4), switching-gate traces (Fig. 6/A3) and RL curves (Fig. 8/A5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(os.path.join(args.out, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    E = env_module(args.task)
    try:                # the env (Fig. 2 style): one pretraining-task layout, rendered by the env's rgb_array mode
        env = (E.GridPinpadEnv if args.task == "grid" else E.AntPinpadEnv)(render_mode="rgb_array")
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
    if curve:                                    # the pretraining diagnostics against training minutes
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        mins = [c["minutes"] for c in curve]
        lines = ([("mse", "mean-action squared error")] if args.task == "ant" else
                 [("opt_acc_pair", "optimal-action acc, pair-determined"), ("opt_acc_ambiguous", "optimal-action acc, ambiguous")])
        for key, label in lines:
            ax.plot(mins, [c[key] for c in curve], "o-", label=label)
        ax.plot(mins, [c["probe_mid"] - c["probe_l0"] for c in curve], "s-", label="probe gap, layer L/2 - layer 0")
        ax.set(xlabel="pretraining minutes", title="Pretraining diagnostics (held-out)")
        if args.task == "grid":
            ax.set_ylim(0, 1)
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
        if "controller_success_oracle" in results:      # the diagnostic of section 8 (not the protocol)
            ax.plot([L1 // 2], [results["controller_success_oracle"]], "*", ms=10, color="C3",
                    label="trained with post-training episodes (diagnostic)")
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
    for name in FIGURES:             # a figure of a stage whose results are gone is gone too
        if os.path.join(args.out, name) not in paths and os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    return paths


FIGURES = ("env.png", "pretrain_curve.png", "probe_accuracy.png", "controller_success.png", "beta_traces.png",
           "rl_curves.png", "rl_curves_log.png")


# ---------------------------------------------------------------------------------------------------
# 13. main(): the stages in order
def open_run_folder(args: Args) -> None:
    """Create --out, or stop with one line saying why it cannot be used; --fresh deletes its checkpoints."""
    try:
        os.makedirs(args.out, exist_ok=True)
        atomic_write(os.path.join(args.out, ".writable"), lambda f: f.write(b""))
        os.remove(os.path.join(args.out, ".writable"))
    except OSError as e:
        die(f"--out {args.out}: cannot use it as the run folder ({e.strerror or e}); choose another --out")
    if args.fresh:
        for name in CHECKPOINTS:
            if os.path.exists(ckpt_path(args, name)):
                os.remove(ckpt_path(args, name))
                print(f"[13 main] --fresh: deleted {ckpt_path(args, name)}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    open_run_folder(args)
    np.random.seed(args.seed)                    # seed once; each stage also seeds its own generators
    torch.manual_seed(args.seed)
    log = Logger(args.out)
    log("1 args", " ".join(f"{k}={v}" for k, v in dataclasses.asdict(args).items()))
    t_start, stage_time = time.time(), {}
    results = {"task": args.task, "seed": args.seed, "device": str(device), "args": dataclasses.asdict(args)}
    # Per checkpoint: "trained" or "reused" by this run, "kept" (a later stage's, still valid), and its checksum,
    # which its children's fingerprints chain (the grid's data are no checkpoint: made from the seed).
    status, sums = {}, ({"data": ""} if args.task == "grid" else {})

    def record(name: str, ck: dict) -> None:     # a checkpoint's metrics into results.json
        if name in ("probe", "controllers", "metacontroller"):
            results.update({k: v for k, v in ck["metrics"].items() if k != "train_time_s"})
        else:
            results[name] = ck["metrics"]

    def stage(name: str, train) -> dict:
        ck, status[name] = run_stage(args, name, sums[CHECKPOINTS[name][1]], log, train)
        sums[name] = ck["checksum"]
        record(name, ck)
        return ck

    def finish(stopped: str = "") -> dict:
        """Add the results of later stages whose checkpoints still fit, make the figures, write results.json."""
        kept, dropped = [], []
        for name, (_, parent, _, _) in CHECKPOINTS.items():
            if name in status or not os.path.exists(ckpt_path(args, name)):
                continue
            ck = load_ckpt(ckpt_path(args, name), fingerprint(args, name, sums[parent])) if parent in sums else None
            if ck is not None and ck.get("finished", True):
                record(name, ck)
                sums[name], status[name] = ck["checksum"], "kept"
                kept.append(name)
            else:
                dropped.append(name)
        if kept or dropped:
            log("13 main", f"results.json keeps the stages not run now whose checkpoints still fit: "
                f"{', '.join(kept) or 'none'}; leaves out those that no longer fit: {', '.join(dropped) or 'none'}")
        figs = [] if stopped else make_figures(args, results)
        results.update(stage_status=status, stage_time_s=stage_time, wall_time_s=time.time() - t_start,
                       **({"stopped": stopped} if stopped else {}))
        atomic_write(os.path.join(args.out, "results.json"),
                     lambda f: f.write(json.dumps(finite(results), indent=1, allow_nan=False).encode()))
        if not stopped:
            log("13 main", f"done in {results['wall_time_s'] / 60:.1f} min (stage {args.stop_after}) | results.json "
                f"and figures in {args.out}: {', '.join(os.path.basename(f) for f in figs)}")
        return results

    def done(name: str, t: float) -> bool:
        """Record the stage's time; True if --stop-after ends the run here."""
        stage_time[name] = time.time() - t
        return args.stop_after == name

    try:
        if args.task == "ant":                   # fail early, with the fix, where MuJoCo cannot load
            try:
                env_module("ant").AntPinpadEnv().close()
            except Exception as e:  # noqa: BLE001
                die(f"--task ant needs MuJoCo ({type(e).__name__}: {str(e)[:120]}); pip install -r requirements.txt "
                    f"(gymnasium[mujoco], mujoco)")
        t = time.time()
        data = make_datasets(args, log)
        if args.task == "ant":                   # the stored sets: a checkpoint that pretraining builds on
            sums["data"], status["data"] = data["checksum"], data["status"]
            results.update(expert_success_pretrain=data["expert"]["pretrain"],
                           expert_success_posttrain=data["expert"]["posttrain"])
        stage_time["data"] = time.time() - t
        log("3 data", f"held-out D {len(data['heldout'])} episodes, D* {len(data['dstar_train'])} train + "
            f"{len(data['dstar_heldout'])} held-out ({stage_time['data']:.1f}s)")

        t = time.time()
        ck = stage("pretrain", lambda: pretrain(args, data, device, log))
        torch.manual_seed(args.seed)             # the same random stream from here on, trained or reused
        model = GPT(args).to(device)
        load_weights(model, ck["model"], ckpt_path(args, "pretrain"))
        model.requires_grad_(False).eval()       # frozen from here on
        if done("pretrain", t):
            return finish()

        t = time.time()
        stage("probe", lambda: probe_stage(args, model, data, device, log))
        if done("probe", t):
            return finish()

        t = time.time()
        stage("controllers", lambda: controller_stage(args, model, data, device, log))
        mid = args.n_layer // 2
        log("13 main", f"probe layer 0 {results['probe_accuracy'][0]:.3f} -> layer {mid} "
            f"{results['probe_accuracy'][mid]:.3f} | controllers at layer {mid}: pretraining tasks "
            f"{results['controller_success_pretrain'][mid]} / post-training {results['controller_success'][mid]} | "
            f"base alone {results['base_success_pretrain']:.3f} / {results['base_success']:.3f}")
        if done("controllers", t):
            return finish()

        t = time.time()
        ck = stage("metacontroller", lambda: metacontroller_stage(args, model, data, device, log))
        mcs = {k: MetaController(args).to(device) for k in ("mc", "mc_forced")}
        for k, mc in mcs.items():
            load_weights(mc, ck[k], ckpt_path(args, "metacontroller"))
        if done("metacontroller", t):
            return finish()

        t = time.time()
        stage("token_rl", lambda: token_rl(args, model, data, device, log))
        stage("internal_rl", lambda: internal_rl(args, model, mcs["mc"], data, device, log, forced=False))
        stage("internal_rl_no_temporal", lambda: internal_rl(args, model, mcs["mc_forced"], data, device, log,
                                                             forced=True))
        done("rl", t)
        log("13 main", f"switch F1 {results['switch_f1']:.3f} | post-training success after {args.rl_episodes} "
            f"episodes: token-level RL {results['token_rl']['success']:.3f}, internal RL "
            f"{results['internal_rl']['success']:.3f}, internal RL without temporal abstraction "
            f"{results['internal_rl_no_temporal']['success']:.3f}")
        return finish()
    except (KeyboardInterrupt, Diverged) as e:   # one line, no traceback; results.json stays valid
        finished = [name for name, s in status.items() if s != "kept"]
        if isinstance(e, Diverged):
            msg, code = str(e), 1
        else:
            msg, code = (f"interrupted; finished stages: {', '.join(finished) or 'none'} (checkpoints in {args.out}); "
                         f"rerun the same command to continue from there"), 130
        finish(stopped=msg)
        print(f"internal_rl.py: {msg}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
