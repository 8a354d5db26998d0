"""internal_rl.py: a single-file, CPU-sized reference implementation of

    "Emergent temporal abstractions in autoregressive models enable hierarchical reinforcement learning"
    Kobayashi, Schimpf, Schlegel, ..., Meulemans, Sacramento (2025), arXiv:2512.20605.

Table of contents: one section per step of the paper's pipeline, simple before new (a run trains section 10's
metacontroller before section 9's token-level RL)
    1. Args: every setting, presets per task
    2. Plumbing: logging, and checkpoints that know what made them
    3. Data: expert trajectories D and D*, no rewards (the true subgoals only for analysis)
    4. The base model: a causal transformer whose residual stream e_{t,l} the later sections read and edit
    5. Rollouts: the frozen model, optionally controlled, acting in the env
    6. Stage "pretrain": next-action prediction + lambda * next-observation prediction (Eq. 5)
    7. Stage "probe": is the current subgoal linearly readable at layer l? (Eq. 6-7, Fig. 3, App. C.2)
    8. Stage "controllers": e <- e + U e (Eq. 1), one U per subgoal: do they steer the frozen model? (Fig. 4, App. C.3)
    9. The RL toolkit and token-level RL (App. C.5.2: clipped ratio, no critic, one advantage per episode)
    10. Stage "metacontroller": controllers U_t = f_hyp(z_t) and when to switch (beta_t), without labels (App. C.4)
    11. Internal RL: a causal policy picks a code z when the frozen switch fires (App. C.5); App. E.2 as a toy
    12. Figures
    13. main(): the stages in order

Commands (a 2-core CPU is enough; --help lists every setting with the chosen task's and preset's defaults)
    python internal_rl.py --task grid [--preset quick|paper]  # every stage (quick: minutes; paper: a GPU, Table A4)
    python internal_rl.py --task grid --stop-after probe   # or: pretrain, controllers, metacontroller, rl
    python internal_rl.py --task grid --sweep alpha        # Fig. 7's rate-distortion sweep (end of section 10)
    MUJOCO_GL=egl python internal_rl.py --task ant         # the MuJoCo ant
    python -m pytest -q test_internal_rl.py                # the tests
Outputs go to --out (default runs/<task>-seed<seed>[-<preset>]): checkpoints, metrics.jsonl (the log as JSON), the
figures, results.json. Stages whose settings and code are unchanged are reused (section 2; --fresh: none), so after
Ctrl-C rerun the same command. Log lines start with the number of the section that writes them.

Notation (shape comments use these letters)
    B batch (episodes; n in rollouts)   T time steps   D residual width (n_embd)   L blocks (n_layer)   nh heads,
    hs = D / nh   G subgoals (4: colour pairs on the grid, colours on the ant)   r controller rank   Z code size (n_z)
    H the metacontroller's hidden size (mc_hidden)   N decisions per episode (internal RL)   T' actions per episode
    (steps or decisions)   e_{t,l} the residual at step t after block l (0: the embedding)   U = A B^T (A, B: D x r)

Deviations (the README's table gives reasons): a CPU-sized model and budget (d=64, 4 blocks; the paper's: --preset
paper); an agent-centred embedding, object attention (section 4); GRUs for the Hawk SSMs (the ant's base model: the
transformer); a KL warm-up; an ant expert by hand.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
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
# 1. Args: every setting, presets per task
# Every tunable number, by the section that uses it; --help prints this text with the chosen --task's and --preset's defaults.
def arg(default, help: str):
    """A dataclass field that carries its own --help text."""
    return field(default=default, metadata={"help": help})

@dataclass
class Args:
    # -- run --
    task: str = arg("grid", "environment: grid (gridworld-pinpad) or ant (ant-pinpad, MuJoCo)")
    preset: str = arg("default", "default (the full run), quick (every stage in minutes: demos, smoke runs, tests) or "
                      "paper (grid: the sizes and budgets of Tables A4, A6, A7, A9, A13, A16, for a GPU)")
    seed: int = arg(0, "seed for everything (data, initialisation, evaluation episodes)")
    device: str = arg("auto", "cpu, cuda, or auto (cuda when present)")
    out: str = arg("", "run folder (default runs/<task>-seed<seed>, plus -<preset> for a preset other than default)")
    stop_after: str = arg("rl", "last stage to run: pretrain, probe, controllers, metacontroller or rl")
    log_every: int = arg(200, "log a training line every this many steps")
    fresh: bool = arg(False, "retrain every stage: delete the run folder's checkpoints first")
    # -- data (section 3) --
    epsilon: float = arg(0.0, "grid: expert noise in D, the probability of a random non-terminating action (paper: 0)")
    batch_size: int = arg(64, "episodes per pretraining batch (Table A4: 1024)")
    bucket_batches: int = arg(8, "batches drawn together and sorted by length, to cut padding")
    n_heldout: int = arg(2000, "held-out episodes of D (pretraining metrics)")
    n_dstar: int = arg(8000, "episodes of D* (epsilon = 0) for controllers and metacontroller; as many again held out")
    n_train: int = arg(0, "ant: episodes of the stored set D, sampled with replacement (the grid draws fresh ones)")
    action_noise: float = arg(0.0, "ant: std of Gaussian noise on the expert's actions in D (D* has none)")
    workers: int = arg(2, "processes that make expert episodes: the ant's stored sets, the grid's with --fast-expert")
    fast_expert: bool = arg(False, "grid: pretraining batches made and bucketed by gridworld.ExpertPool's --workers processes")
    expert_eval: int = arg(200, "ant: post-training episodes that measure the expert (RL is normalised by it)")
    # -- base model (section 4) --
    n_layer: int = arg(4, "transformer blocks L (Table A4: 6)")
    n_head: int = arg(4, "attention heads (Table A16: 4)")
    n_embd: int = arg(64, "residual width D (Table A4: 256)")
    obj_attn: str = arg("", "grid: blocks that also attend over their step's objects: 'last', a list of 1..L, or ''")
    mlp_mult: int = arg(4, "MLP hidden = mlp_mult * n_embd, ReLU (Table A16: 512 = 2 * 256)")
    rel_buckets: int = arg(32, "relative-position attention-bias buckets (Table A16: 32)")
    # -- pretraining (section 6) --
    pretrain_steps: int = arg(9600, "optimiser steps; every grid batch is fresh expert data (Table A4: 256,000)")
    pretrain_minutes: float = arg(0.0, "stop pretraining at the first evaluation after this many minutes (0: no limit)")
    lr: float = arg(2e-3, "AdamW learning rate (Table A4: 3e-4 at batch 1024)")
    warmup: int = arg(200, "linear learning-rate warm-up steps, then constant (Table A4: constant)")
    cooldown: float = arg(0.3, "fraction of the final steps over which the learning rate decays linearly to 0 (Table A4: 0)")
    weight_decay: float = arg(0.03, "AdamW weight decay (Table A4)")
    obs_coef: float = arg(0.01, "lambda in Eq. 5: weight of the next-observation loss (Table A4: 0-0.01; A5, ant: 10)")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    eval_every: int = arg(1000, "held-out metrics every this many pretraining steps")
    # -- probes (section 7) --
    n_probe: int = arg(4000, "held-out D* episodes for the probes (half to fit, half to score)")
    probe_steps: int = arg(300, "full-batch AdamW steps per layer probe (Table A6: 8,000 at batch 512)")
    probe_lr: float = arg(5e-2, "probe learning rate, on standardised features (Table A6: 1e-3)")
    # -- controllers (section 8) --
    ctrl_rank: int = arg(16, "rank r of each controller U = A B^T, and of f_hyp (Tables A7, A9: 16); 0: full rank (ant)")
    ctrl_steps: int = arg(400, "optimiser steps per layer (Table A7: 3200 at batch 512)")
    ctrl_batch: int = arg(128, "D* episodes per controller batch (Table A7: 512)")
    ctrl_lr: float = arg(3e-3, "controller learning rate (Table A7: 1e-3)")
    ctrl_layers: str = arg("all", "layers to train controllers at: 'all' (0..L), 'mid' (L/2) or a comma list")
    n_eval: int = arg(500, "evaluation episodes per task family (pretraining tasks / post-training task)")
    ctrl_oracle: bool = arg(True, "grid diagnostic (not the protocol): controllers at L/2 on D* + post-training episodes")
    # -- the RL toolkit and token-level RL (section 9) --
    rl_episodes: int = arg(24576, "training episodes per RL method, the same for each (Table A13: 100k steps of 1024)")
    rl_batch: int = arg(256, "episodes per RL batch (Table A13: 1024)")
    rl_epochs: int = arg(2, "optimiser steps per batch (full-batch PPO epochs)")
    clip_coef: float = arg(0.2, "PPO ratio clip epsilon")
    token_lr: float = arg(1e-5, "AdamW learning rate of token-level RL, the whole model (App. C.5.5 scans 3e-6 to 3e-4)")
    rl_eval: int = arg(1000, "post-training episodes of each final test, on env seeds unused in training")
    # -- the metacontroller (section 10) --
    alpha: float = arg(0.1, "KL weight alpha in Eq. 3 (Table A9 sweeps 0 to 1)")
    n_z: int = arg(8, "size Z of the controller code z (Table A9: 8)")
    mc_hidden: int = arg(32, "hidden size of the history GRU, the sequence embedding and the decoder (Table A9: 32)")
    mc_enc_hidden: int = arg(64, "hidden size of the encoder MLP (Table A9: 64) and of the switching unit's (unspecified)")
    mc_steps: int = arg(2000, "metacontroller optimiser steps (Table A9: 64,000 at batch 512)")
    mc_batch: int = arg(128, "D* episodes per metacontroller batch (Table A9: 512)")
    mc_lr: float = arg(3e-3, "metacontroller learning rate (Table A9: 1e-3)")
    mc_kl_warmup: int = arg(600, "steps over which alpha ramps up from 0 (the paper: none)")
    mc_gumbel: float = arg(0.0, "Gumbel-sigmoid temperature of beta in training (0: plain sigmoid, the paper's default)")
    sweep: str = arg("", "'alpha': Fig. 7's sweep (frozen and co-trained metacontrollers) instead of the later stages")
    sweep_steps: int = arg(400, "--sweep: optimiser steps of each frozen-base metacontroller")
    cotrain_steps: int = arg(1500, "--sweep: joint optimiser steps of each co-trained base model and metacontroller")
    # -- internal RL (section 11) --
    irl_lr: float = arg(1e-3, "AdamW learning rate of the internal-RL policy (Table A13: 3e-5)")
    irl_hidden: int = arg(64, "GRU width of the causal z-policy (Table A13: a 1-layer SSM of width 256)")

# Presets: the fields each changes. Grid: object attention in the top block; ant: a stored D, full-rank controllers;
# paper: Tables A4, A6, A7, A9, A13 and A16 (what they leave open stays as in the CPU default).
GRID = dict(obj_attn="last")
ANT = dict(n_train=2500, action_noise=0.03, n_heldout=200, n_dstar=400, n_embd=128, batch_size=16, pretrain_steps=2000,
           lr=1e-3, obs_coef=0.0, eval_every=500, log_every=100, n_probe=400, ctrl_rank=0, ctrl_batch=16, ctrl_layers="mid",
           n_eval=100, mc_steps=150, mc_batch=16, mc_kl_warmup=45, rl_episodes=1024, rl_batch=64, rl_eval=200)
QUICK = dict(n_heldout=400, n_dstar=1000, n_probe=1000, eval_every=200, log_every=100, ctrl_layers="mid",
             ctrl_steps=150, n_eval=100, ctrl_oracle=False, mc_steps=200, mc_batch=64, mc_kl_warmup=60,
             rl_episodes=1024, rl_batch=128, rl_eval=200, sweep_steps=100, cotrain_steps=200)
PAPER = dict(n_layer=6, n_embd=256, mlp_mult=2, batch_size=1024, pretrain_steps=256_000, lr=3e-4, warmup=0, cooldown=0.0,
             fast_expert=True, probe_steps=8000, probe_lr=1e-3, ctrl_steps=3200, ctrl_batch=512, ctrl_lr=1e-3, mc_steps=64_000,
             mc_batch=512, mc_lr=1e-3, mc_kl_warmup=0, rl_batch=1024, rl_episodes=1024 * 100_000, irl_lr=3e-5, irl_hidden=256)
ANT_QUICK = dict(n_train=300, n_heldout=40, n_dstar=60, n_probe=60, pretrain_steps=150, eval_every=50, ctrl_steps=50,
                 n_eval=20, mc_steps=20, mc_batch=16, mc_kl_warmup=6, rl_episodes=64, rl_batch=32, rl_eval=20, expert_eval=40)
PRESETS = {"grid": {"default": GRID, "quick": {**GRID, **QUICK, "pretrain_steps": 600}, "paper": {**GRID, **PAPER}},
           "ant": {"default": ANT, "quick": {**ANT, **QUICK, **ANT_QUICK}}}
STAGES = ("pretrain", "probe", "controllers", "metacontroller", "rl")
MAY_BE_ZERO = ("seed", "epsilon", "obs_coef", "weight_decay", "warmup", "cooldown", "alpha", "mc_kl_warmup",
               "mc_gumbel", "n_train", "action_noise", "ctrl_rank", "pretrain_minutes")    # every other number: > 0
ANT_ONLY = ("n_train", "action_noise", "workers", "expert_eval")

def die(msg: str):
    """Stop with one line on stderr and no traceback: bad input, unreadable checkpoints, missing MuJoCo."""
    sys.exit(f"internal_rl.py: error: {msg}")

def parse_args(argv=None) -> Args:
    """--task and --preset first (they set the defaults --help shows), then every flag; bad input: one line."""
    pre = argparse.ArgumentParser(add_help=False)                   # a first pass that knows two flags only
    for name in ("task", "preset"):
        pre.add_argument("--" + name, default=getattr(Args, name))
    first, _ = pre.parse_known_args(argv)
    for flag, value, valid in (("task", first.task, PRESETS), ("preset", first.preset, PRESETS.get(first.task, {}))):
        if value not in valid:                                       # (an unknown task stops at the first)
            die(f"unknown --{flag} {value!r}; valid choices: {', '.join(valid)}")
    preset = PRESETS[first.task][first.preset]
    defaults = {**dataclasses.asdict(Args()), **preset}              # what --help shows, per task and preset
    p = argparse.ArgumentParser(description="Internal RL reference implementation (arXiv 2512.20605).")
    for f in dataclasses.fields(Args):          # f.type is a string ("int", ...): annotations are postponed
        kind = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else \
            {"type": {"int": int, "float": float, "str": str}[f.type]}
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default {defaults[f.name]!r})", **kind)
    given = vars(p.parse_args(argv))                                 # only the flags on the command line
    args = Args(**{**preset, **given})                               # dataclass defaults < preset < command line
    grid = args.task == "grid"
    for f in dataclasses.fields(Args):
        v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            die(f"{flag} must be a finite number, got {v}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or (v == 0 and f.name not in MAY_BE_ZERO)):
            die(f"{flag} must be {'non-negative' if f.name in MAY_BE_ZERO else 'positive'}, got {v}")
        if grid and f.name in ANT_ONLY and f.name in given and not (f.name == "workers" and args.fast_expert):
            die(f"{flag} is for the ant; the grid draws fresh expert episodes every step (--workers: with --fast-expert)")
    checks = [(args.stop_after not in STAGES, f"unknown --stop-after {args.stop_after!r}; valid choices: {', '.join(STAGES)}"),
              (grid and args.ctrl_rank == 0, "--ctrl-rank 0 (full rank) is for the ant; the grid needs a rank, e.g. 16"),
              (args.cooldown > 1, f"--cooldown is a fraction of the steps in [0, 1], got {args.cooldown}"),
              (args.epsilon >= 1, f"--epsilon must be in [0, 1), got {args.epsilon}"),
              (args.n_probe < 2, "--n-probe needs at least 2 episodes (half fit, half score)"),
              (args.n_dstar < args.n_probe, f"--n-probe ({args.n_probe}) must be at most --n-dstar ({args.n_dstar})"),
              (args.n_embd % args.n_head != 0, f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})"),
              (not grid and not args.n_train, "--task ant needs a stored dataset: --n-train must be positive"),
              (args.sweep not in ("", "alpha"), f"unknown --sweep {args.sweep!r}; valid choice: alpha"),
              (not grid and args.sweep, "--sweep is for the grid (its co-trained runs draw fresh expert episodes)"),
              (not grid and args.fast_expert, "--fast-expert is for the grid (the ant's D is a stored set)"),
              (not grid and args.epsilon > 0, "--epsilon is for the grid; the ant's expert noise is --action-noise"),
              (args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()),
               f"--device {args.device!r} is not available here; valid choices: auto, cpu"
               + (", cuda" if torch.cuda.is_available() else " (no CUDA device found)"))]
    for bad, msg in checks:                                          # the first broken rule stops the run
        if bad:
            die(msg)
    ctrl_layers(args)                                                # each stops the run, naming its flag
    obj_attn_blocks(args)
    suffix = "" if args.preset == "default" else f"-{args.preset}"          # runs/grid-seed0, runs/grid-seed0-quick
    args.out = args.out or os.path.join("runs", f"{args.task}-seed{args.seed}{suffix}")
    return args

def layer_list(text: str, named: dict, lo: int, hi: int, flag: str) -> list:
    """'3,4' -> [3, 4], or a named choice; every layer in lo..hi, else stop with one line naming the flag."""
    try:
        layers = named[text] if text in named else [int(s) for s in text.split(",")]
    except ValueError:
        layers = [lo - 1]                                            # not a number: reported as out of range
    if any(not lo <= l <= hi for l in layers):
        die(f"{flag} must be {', '.join(repr(k) for k in named)} or layers in {lo}..{hi}, got {text!r}")
    return layers

def obj_attn_blocks(args: Args) -> list:
    if args.obj_attn and args.task != "grid":
        die("--obj-attn is for the grid (the ant's observation has no objects)")
    return layer_list(args.obj_attn, {"": [], "last": [args.n_layer]}, 1, args.n_layer, "--obj-attn")

def ctrl_layers(args: Args) -> list:
    return layer_list(args.ctrl_layers, {"all": list(range(args.n_layer + 1)), "mid": [args.n_layer // 2]}, 0,
                      args.n_layer, "--ctrl-layers")

# ---------------------------------------------------------------------------------------------------
# 2. Plumbing: logging, and checkpoints that know what made them              # BOILERPLATE
# Not part of the method. Each stage saves <out>/<name>.pt with a *fingerprint*, reused only while it matches: a hash
# of its settings (CHECKPOINTS), its code (what of sections 3-11 it reaches by name, as syntax trees, and the env file
# for the stages that make data) and its parent's checksum. Edit mc_loss: the metacontroller retrains; a comment: nothing.
class Logger:
    """Print-first logging: one line per event, also appended to metrics.jsonl."""
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
    return f"{el:.0f}s elapsed, eta {el / max(done, 1) * (total - done):.0f}s"

RL_FIELDS = ("rl_episodes", "rl_batch", "rl_epochs", "clip_coef", "rl_eval", "expert_eval")
MC_FIELDS = ("n_dstar", "n_probe", "alpha", "n_z", "mc_hidden", "mc_enc_hidden", "ctrl_rank", "mc_batch", "mc_lr", "bucket_batches")
# Every checkpoint, in pipeline order: (its section, its parent checkpoint, the settings it reads, the entry points
# of its code). The grid has no "data" checkpoint: its episodes come from the seed, in pretraining's fingerprint.
CHECKPOINTS = {
    "data": (3, None, ("task", "seed", "n_train", "action_noise", "n_heldout", "n_dstar", "expert_eval"), ("ant_datasets",)),
    "pretrain": (6, "data", ("task", "seed", "epsilon", "n_heldout", "n_train", "action_noise", "batch_size",
                             "bucket_batches", "n_layer", "n_head", "n_embd", "obj_attn", "mlp_mult", "rel_buckets",
                             "pretrain_steps", "lr", "warmup", "cooldown", "weight_decay", "obs_coef", "grad_clip",
                             "eval_every", "fast_expert", "pretrain_minutes"), ("make_datasets", "pretrain")),
    "probe": (7, "pretrain", ("n_dstar", "n_probe", "probe_steps", "probe_lr"), ("probe_stage",)),
    "controllers": (8, "pretrain", ("n_dstar", "n_probe", "ctrl_rank", "ctrl_steps", "ctrl_batch", "ctrl_lr",
                                    "ctrl_layers", "n_eval", "ctrl_oracle"), ("controller_stage",)),
    "metacontroller": (10, "pretrain", MC_FIELDS + ("mc_steps", "mc_kl_warmup", "mc_gumbel", "n_eval"), ("metacontroller_stage",)),
    "token_rl": (9, "pretrain", RL_FIELDS + ("token_lr",), ("token_rl",)),
    "internal_rl": (11, "metacontroller", RL_FIELDS + ("irl_lr", "irl_hidden"), ("internal_rl",)),
    "internal_rl_no_temporal": (11, "metacontroller", RL_FIELDS + ("irl_lr", "irl_hidden"), ("internal_rl",)),
    "sweep": (10, "pretrain", MC_FIELDS + RL_FIELDS + ("sweep_steps", "cotrain_steps", "irl_lr", "irl_hidden"), ("alpha_sweep",)),
}

def syntax(tree) -> str:
    """A syntax tree as text, without docstrings: what the code does, not how it is commented."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node, False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)

@functools.lru_cache(maxsize=None)
def code_digest(roots: tuple, env_file: str = "") -> str:
    """Hash of every top-level function, class and constant of sections 3-11 of this file that the functions
    ``roots`` reach by name, directly or through each other (and of ``env_file``, if given)."""
    src = open(os.path.abspath(__file__)).read()
    lines, index = src.splitlines(), {}                                    # name -> (its syntax, names it uses)
    banners = [i + 2 for i, line in enumerate(lines[:-1]) if line.startswith("# ---") and re.match(r"# \d+\. ", lines[i + 1])]
    for node in ast.parse(src).body:
        section = sum(b < node.lineno for b in banners)                   # banners above it = its section number
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)]
        for name in names if 3 <= section <= 11 else []:
            index[name] = (syntax(node), {n.id for n in ast.walk(node) if isinstance(n, ast.Name)})
    seen, todo = set(), list(roots)                                         # everything the roots reach by name
    while todo:
        name = todo.pop()
        if name in index and name not in seen:
            seen.add(name)
            todo += index[name][1]
    text = "".join(index[name][0] for name in sorted(seen)) + (syntax(ast.parse(open(env_file).read())) if env_file else "")
    return hashlib.sha256(text.encode()).hexdigest()

def fingerprint(args: Args, name: str, parent_sum: str = "") -> str:
    """What makes a checkpoint: its settings, its code and the checksum of the checkpoint it builds on."""
    _, _, fields, roots = CHECKPOINTS[name]
    env_file = env_module(args.task).__file__ if name in ("data", "pretrain") else ""
    cfg = json.dumps({k: getattr(args, k) for k in fields}, sort_keys=True)
    return hashlib.sha256((cfg + code_digest(roots, env_file) + parent_sum).encode()).hexdigest()[:16]

def checksum(obj) -> str:
    """sha256 of everything a checkpoint stores: its structure as JSON, each tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    def tensor(x):                                     # json.dumps calls this for what JSON cannot hold
        if torch.is_tensor(x):
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{x.dtype}{tuple(x.shape)}" if torch.is_tensor(x) else repr(x)
    h.update(json.dumps(obj, sort_keys=True, default=tensor).encode())
    return h.hexdigest()

def atomic_write(path: str, write) -> None:
    """``write(f)`` into a temporary file renamed to ``path``: a failed write leaves the old file untouched."""
    tmp = path + ".tmp"                                     # same folder, so that os.replace is atomic
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

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
    if ck["fingerprint"] != fp:                             # made by other settings, code or parent: not used
        if log is not None:
            log(tag, f"{path} was made with other settings or code: retraining this stage")
        return None
    return {**ck, "checksum": stored}

def run_stage(args: Args, name: str, parent_sum: str, log: Logger, train) -> tuple:
    """(checkpoint, status): <out>/<name>.pt and "reused" if its fingerprint matches, else ``train()``'s, saved."""
    path, fp, tag = os.path.join(args.out, name + ".pt"), fingerprint(args, name, parent_sum), f"{CHECKPOINTS[name][0]} {name}"
    if (ck := load_ckpt(path, fp, log, tag)) is not None:
        log(tag, f"reusing {path}")
        return ck, "reused"
    ck = {**train(), "fingerprint": fp}
    ck["checksum"] = checksum(ck)                            # of everything but itself
    atomic_write(path, lambda f: torch.save(ck, f))
    return ck, "trained"

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
    return gw if task == "grid" else importlib.import_module("ant_tasks")

# ---------------------------------------------------------------------------------------------------
# 3. Data: expert trajectories D and D*, length-bucketed batches                      [App. C.1.1, C.4.4]
# D: expert trajectories on the 16 pretraining tasks (epsilon-noisy, if asked) pretrain the model; D*, the same with
# epsilon = 0, trains the controllers and the metacontroller.
# A grid episode (gridworld.expert_episode) holds cells (T+1, 13): o_1..o_{T+1} in index form (the cells of walls
# 0..3, colours 0..7, the agent: the paper's one-hot, losslessly); actions (T,); subgoals (T,), the true g_t (for
# analysis only); next_colour (T,), optimal (T, 4) for the diagnostics. Grid batches are always fresh; the ant's
# expert is ~100x slower, so its D is a stored set (obs (T+1, 41), actions (T, 8), subgoals (T,)), kept as data.pt.
def generate_episodes(rng: np.random.Generator, n: int, tasks, epsilon: float) -> list:
    """n expert episodes, each on a task drawn uniformly from ``tasks``."""
    return [gw.expert_episode(rng, tasks[int(rng.integers(len(tasks)))], epsilon) for _ in range(n)]

def collate(episodes: list, device=None) -> dict:
    """Pad episodes into a batch (numpy, or tensors on ``device``); ``mask`` (B, T) marks the real steps. The input
    at step t is o_t, the targets a_t and o_{t+1}; padded steps keep obs = 0 (on the grid a valid index) and every
    loss skips them. The grid's indices travel as int8 (8x less to send and copy) and become int64 on ``device``."""
    lengths, grid = np.array([len(ep["actions"]) for ep in episodes]), "cells" in episodes[0]
    real = np.arange(lengths.max())[None, :] < lengths[:, None]                 # (B, T) the real steps
    def pad(arrays, fill, dtype):                        # B arrays (n_i, ...) -> (B, T, ...), padded with ``fill``
        out = np.full(real.shape + arrays[0].shape[1:], fill, dtype=dtype)
        out[real] = np.concatenate(arrays)                # episode after episode, as ``real`` is laid out
        return out
    o = [ep["cells"] if grid else ep["obs"] for ep in episodes]                 # o_1..o_{T+1} per episode
    f, num = (-1, np.int8) if grid else (0, np.float32)
    b = {"obs": pad([x[:-1] for x in o], 0, num),                              # (B, T, 13) or (B, T, 41)
         "actions": pad([ep["actions"] for ep in episodes], f, num),           # (B, T) or (B, T, 8)
         "next_obs": pad([x[1:, -1] if grid else x[1:] for x in o], f, num),   # agent cell (B, T), or (B, T, 41)
         "subgoals": pad([ep["subgoals"] for ep in episodes], -1, np.int8), "mask": real}     # (B, T) g_t; the mask
    if grid:                                                                     # (B, T), (B, T, 4): diagnostics
        b.update(next_colour=pad([ep["next_colour"] for ep in episodes], -1, np.int8),
                 optimal=pad([ep["optimal"] for ep in episodes], False, bool))
    return b if device is None else on_device(b, device)

def on_device(b: dict, device) -> dict:
    """A collated batch as tensors on ``device``; int8 indices become int64 there."""
    to = lambda v: torch.from_numpy(v).to(device)
    return {k: to(v).long() if v.dtype == np.int8 else to(v) for k, v in b.items()}

def buckets(episodes: list, rng: np.random.Generator, size: int) -> list:
    """Episodes sorted by length, cut into collated batches of ``size`` (little padding), in random order."""
    eps = sorted(episodes, key=lambda ep: len(ep["actions"]))
    return [collate(eps[i:i + size]) for i in size * rng.permutation(-(-len(eps) // size))]

def bucketed_batches(make, device):
    """Endless stream of batches on ``device``; ``make()`` returns a list of them from ``buckets``."""
    while True:
        yield from (on_device(b, device) for b in make())

def sample_from(rng: np.random.Generator, episodes: list):
    """A ``draw(n)``: n episodes of a stored set (e.g. D*), with replacement."""
    return lambda n: [episodes[i] for i in rng.integers(len(episodes), size=n)]

def batches_of(episodes: list, size: int, device):
    """Fixed-order, length-sorted batches of a stored set (for evaluation and feature extraction)."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i]["actions"]))
    for i in range(0, len(order), size):
        yield collate([episodes[j] for j in order[i:i + size]], device)

def ant_datasets(args: Args, log) -> dict:
    """The ant's stored sets D and D* (train and held-out each), kept in the checkpoint <out>/data.pt, and the
    expert's success rates (pretraining tasks: its D* attempts; the post-training task: --expert-eval episodes)."""
    ss, ant = np.random.SeedSequence(args.seed).spawn(6), env_module("ant")   # ss[4]: batches and eval seeds
    def generate() -> dict:                   # one tensor per field and set, so that weights_only loading works
        try:
            sets, expert = ant.expert_datasets(ss, args.n_train, args.n_heldout, args.n_dstar, args.expert_eval,
                                               args.action_noise, args.workers, lambda msg: log("3 data", msg))
        except RuntimeError as e:
            die(str(e))
        return {"expert": expert, "sets": {k: {f: torch.from_numpy(v) for f, v in d.items()} for k, d in sets.items()}}
    ck, status = run_stage(args, "data", "", log, generate)
    out = {name: ant.split_episodes({f: t.numpy() for f, t in tensors.items()}) for name, tensors in ck["sets"].items()}
    out.update(train_rng=np.random.default_rng(ss[4].spawn(1)[0]),              # batch sampling
               eval_seed=int(np.random.default_rng(ss[4]).integers(2 ** 31)),  # env seeds for rollouts
               expert=ck["expert"], checksum=ck["checksum"], status=status)    # (main() chains the checksum)
    log("3 data", f"the expert: success {ck['expert']['pretrain']:.3f} on pretraining tasks (D* attempts), "
        f"{ck['expert']['posttrain']:.3f} on the post-training task ({args.expert_eval} episodes)")
    return out

def make_datasets(args: Args, log=None) -> dict:
    """The fixed sets: held-out D, and D* (epsilon = 0) split by episode into train and held-out halves. Each has
    its own random stream (spawned from the seed), and the fresh pretraining stream repeats none of them."""
    if args.task == "ant":
        return ant_datasets(args, log or Logger(args.out))
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(5)]
    return {"train_rng": rngs[0],                                              # fresh pretraining batches
            "heldout": generate_episodes(rngs[1], args.n_heldout, gw.PRETRAIN_TASKS, args.epsilon),
            "dstar_train": generate_episodes(rngs[2], args.n_dstar, gw.PRETRAIN_TASKS, 0.0),
            "dstar_heldout": generate_episodes(rngs[3], args.n_dstar, gw.PRETRAIN_TASKS, 0.0),
            "eval_seed": int(rngs[4].integers(2 ** 31))}                       # env seeds for rollouts

# ---------------------------------------------------------------------------------------------------
# 4. The base model: a causal transformer with an explicit residual stream              [App. C.1.2, D.1]
# An ordinary autoregressive model: one token per time step (the embedded o_t), causal self-attention over the past,
# and per step a distribution over the action a_t and the next observation o_{t+1} (Eq. 5; no action tokens: a_{t-1}
# can be read off o_{t-1}, o_t). What matters later is the *residual stream*: each pre-norm block adds its output to
# it, e_{t,l} = e_{t,l-1} + attn(...) + mlp(...), so a linear edit at one depth is seen by all the blocks above it.
# Object attention (grid, --obj-attn; a deviation): the input embedding *sums* a step's 12 object embeddings, so to
# walk to one colour the MLPs must pull "where is colour c" back out of that sum. In the blocks listed, the token
# also attends over its own step's objects (keys = values = the rows summed): "look up my target".
def relative_buckets(n: int, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """T5-style buckets of d = t_query - t_key >= 0 (Table A16): one per d < num_buckets/2, then log-spaced. No
    absolute positions: a post-training step at t = 60 sees the same recent distances as any pretraining step."""
    d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0)    # (n, n) query x key
    exact = num_buckets // 2
    log_b = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return torch.where(d < exact, d, log_b.clamp(max=num_buckets - 1))       # (n, n) bucket ids

class CausalSelfAttention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.n_head, D = args.n_head, args.n_embd
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)   # q, k, v of all heads; heads -> stream
        self.rel_bias = nn.Embedding(args.rel_buckets, args.n_head)            # one learned bias per bucket and head
        nn.init.zeros_(self.rel_bias.weight)                                    # 0 at first: plain causal attention

    def forward(self, x, buckets, cache=None):
        B, T, D = x.shape                                                                 # x = LN(e_{l-1}) (B, T, D)
        q, k, v = self.c_attn(x).split(D, dim=2)                                          # each (B, T, D)
        q, k, v = (z.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        t0 = 0  # the time step of this call's first token
        if cache is not None:                       # KV cache: write this call's keys/values after the past ones
            if "k" not in cache:                    # buffers for the longest episode (no O(T^2) re-copying)
                cache.update(t=0, **{kv: k.new_zeros(B, self.n_head, len(buckets), D // self.n_head) for kv in "kv"})
            t0 = cache["t"]
            cache["k"][:, :, t0:t0 + T], cache["v"][:, :, t0:t0 + T], cache["t"] = k, v, t0 + T
            k, v = cache["k"][:, :, :t0 + T], cache["v"][:, :, :t0 + T]                  # (B, nh, t0+T, hs)
        S = k.shape[2]  # steps attended to: the cached past + this call's
        bias = self.rel_bias(buckets[t0:t0 + T, :S]).permute(2, 0, 1)                  # (nh, T, S)
        future = torch.arange(S, device=x.device)[None, :] > torch.arange(t0, t0 + T, device=x.device)[:, None]
        bias = bias.masked_fill(future, float("-inf"))                                 # causal mask
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                # (B, nh, T, hs)
        else:        # the same, spelled out: several times faster for one new step over a long cached past
            y = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias).softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))                         # (B, T, D)

class ObjectAttention(nn.Module):
    """Each step's token attends over that step's objects (keys = values = their embeddings); see above."""
    def __init__(self, args: Args):
        super().__init__()
        self.n_head, self.q, self.proj = args.n_head, nn.Linear(args.n_embd, args.n_embd), nn.Linear(args.n_embd, args.n_embd)

    def forward(self, x, objs):
        B, T, O, D = objs.shape                                                  # objs (B, T, 12, D)
        q = self.q(x).view(B, T, 1, self.n_head, D // self.n_head)               # (B, T, 1, nh, hs)
        kv = objs.view(B, T, O, self.n_head, D // self.n_head)                   # (B, T, 12, nh, hs)
        w = ((q * kv).sum(-1) / math.sqrt(D // self.n_head)).softmax(2)          # (B, T, 12, nh) over objects
        return self.proj((w[..., None] * kv).sum(2).reshape(B, T, D))            # (B, T, D)

class Block(nn.Module):
    """Pre-norm residual block [App. D.1]: e <- e + Attn(LN(e)); [e <- e + ObjAttn(LN(e))]; e <- e + MLP(LN(e))."""
    def __init__(self, args: Args, objects: bool = False):
        super().__init__()
        D = args.n_embd
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(D), CausalSelfAttention(args), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, args.mlp_mult * D), nn.ReLU(), nn.Linear(args.mlp_mult * D, D))
        self.ln_o, self.obj_attn = (nn.LayerNorm(D), ObjectAttention(args)) if objects else (None, None)

    def forward(self, x, buckets, cache=None, objs=None):
        x = x + self.attn(self.ln_1(x), buckets, cache)                          # over time (causal)
        if self.obj_attn is not None:
            x = x + self.obj_attn(self.ln_o(x), objs)                            # over this step's objects
        return x + self.mlp(self.ln_2(x))                                # position-wise MLP: e_{t,l} (B, T, D)

OBJ_TYPE = torch.tensor([8] * gw.N_WALLS + list(range(gw.N_COLOURS)))   # object type per channel: walls 8, colours 0..7
N_OFFSETS = (2 * gw.GRID - 1) ** 2          # 13 x 13 possible (row, col) offsets between two cells

class GPT(nn.Module):
    """Causal transformer over one token per time step [Eq. 5, App. D.1]. forward() returns e_{t,l} for every l, and
    adds a controller ``ctrl`` (x -> U x) at layer ``ctrl_layer``: e <- e + U e (Eq. 1); the blocks above see only
    the edited stream. Grid and ant differ in the input embedding, the grid's object attention and the heads (4
    logits; 8 Gaussian means)."""
    def __init__(self, args: Args):
        super().__init__()
        D, self.n_layer, self.task, E = args.n_embd, args.n_layer, args.task, env_module(args.task)
        if args.task == "grid":
            # agent-centred (a choice the paper leaves open): E_agent[agent cell] + sum_objects E_obj[type, offset]
            self.agent_emb = nn.Embedding(gw.N_CELLS, D)                                  # E_agent: one row per cell
            self.obj_emb = nn.Embedding(9 * N_OFFSETS, D)  # E_obj: one row per (object type, offset)
            self.register_buffer("obj_type", OBJ_TYPE.clone(), persistent=False)
        else:
            self.obs_emb = nn.Linear(E.OBS_DIM, D)           # the ant's observation is already a feature vector
        self.blocks = nn.ModuleList([Block(args, l in obj_attn_blocks(args)) for l in range(1, args.n_layer + 1)])  # 1..L
        self.ln_f = nn.LayerNorm(D)
        if args.task == "grid":
            self.action_head = nn.Linear(D, 4)                                   # logits of p(a_t | o_{1:t})
            self.obs_head = nn.Linear(D, gw.N_CELLS)                             # p(o_{t+1} | o_{1:t}): agent cell
        else:
            self.action_head = nn.Linear(D, 8)                                   # mean of p(a_t | o_{1:t})
            self.log_std = nn.Parameter(torch.full((8,), math.log(0.3)))        # its std: one per joint, learned
            self.obs_head = nn.Linear(D, E.OBS_DIM)                              # o_{t+1}, squared error
        self.register_buffer("buckets", relative_buckets(E.MAX_STEPS + 1, args.rel_buckets), persistent=False)
        # GPT-2 init: N(0, 0.02) weights, zero biases; the relative-bias embeddings keep their zeros
        for emb in (self.agent_emb, self.obj_emb) if args.task == "grid" else ():   # the ant has no embeddings
            nn.init.normal_(emb.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for b in self.blocks:                   # GPT-2: scale residual-branch outputs by depth
            for lin in (b.attn.c_proj, b.mlp[2]) + (() if b.obj_attn is None else (b.obj_attn.proj,)):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * args.n_layer))

    def embed(self, obs):
        """obs (B, T, 13) -> e_{t,0} (B, T, D) and the object embeddings (B, T, 12, D) that it sums (the ant: a
        linear map of obs, no objects). Example: agent at cell 24 (row 3, col 3), colour 5 at cell 10 (row 1,
        col 3): offset (-2, 0), so colour 5 adds E_obj[5, (-2 + 6) * 13 + (0 + 6)], the same row at every agent
        position: "colour 5 is two cells up" is learned once, not 49 times as with the flat one-hot."""
        if self.task == "ant":
            return self.obs_emb(obs), None                                       # (B, T, D)
        agent, obj = obs[..., -1], obs[..., :-1]                                 # (B, T), (B, T, 12)
        dr = obj // gw.GRID - (agent // gw.GRID)[..., None] + gw.GRID - 1        # (B, T, 12) row offset in 0..12
        dc = obj % gw.GRID - (agent % gw.GRID)[..., None] + gw.GRID - 1          # (B, T, 12) col offset in 0..12
        objs = self.obj_emb(self.obj_type * N_OFFSETS + dr * (2 * gw.GRID - 1) + dc)   # (B, T, 12, D)
        return self.agent_emb(agent) + objs.sum(-2), objs                        # (B, T, D), (B, T, 12, D)

    def forward(self, obs, ctrl=None, ctrl_layer: int = -1, cache=None):
        """obs (B, T, 13) -> action logits (B, T, 4), next-cell logits (B, T, 49), residuals [L+1 x (B, T, D)], where
        residuals[l] = e_{t,l} before any controller at l (the ant: (B, T, 41) -> means (B, T, 8), next obs (B, T, 41)).
        With ``cache`` (a dict per block) the call continues the sequence it holds: rollouts feed one step at a time."""
        x, objs = self.embed(obs)                                                # e_{t,0}   (B, T, D)
        residuals = [x]                                                                   # residuals[l] = e_{t,l}
        if ctrl is not None and ctrl_layer == 0:
            x = x + ctrl(x)                                                      # ALGO LOGIC: Eq. 1 at l = 0
        for l, block in enumerate(self.blocks, start=1):
            x = block(x, self.buckets, None if cache is None else cache[l - 1], objs)  # e_{t,l} (B, T, D)
            residuals.append(x)
            if ctrl is not None and l == ctrl_layer:
                x = x + ctrl(x)                                                  # ALGO LOGIC: Eq. 1: e <- e + U e
        h = self.ln_f(x)                                                                  # (B, T, D)
        return self.action_head(h), self.obs_head(h), residuals

    # What an action is differs by task; these four methods hold that difference.
    def action_nll(self, act_out, actions, mask):
        """Mean -ln p(a_t | o_{1:t}) over real steps: cross-entropy (grid) or Gaussian NLL summed over joints (ant)."""
        if self.task == "grid":
            return F.cross_entropy(act_out[mask], actions[mask])                          # -ln softmax(logits)[a_t]
        return -self.action_logp(act_out, actions)[mask].mean()

    def action_logp(self, act_out, actions):
        """ln p(a_t | o_{1:t}) per step (B, T)."""
        if self.task == "grid":
            return F.log_softmax(act_out, -1).gather(-1, actions.clamp(min=0)[..., None])[..., 0]
        z = (actions - act_out) / self.log_std.exp()                             # (B, T, 8)
        return (-0.5 * z ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, act_out, gen):
        """Actions sampled from the outputs of one step, (n, 4) or (n, 8)."""
        if self.task == "grid":
            return torch.multinomial(F.softmax(act_out, -1), 1, generator=gen)[:, 0]  # (n,)
        noise = torch.randn(act_out.shape, generator=gen, device=act_out.device)
        return act_out + self.log_std.exp() * noise                              # (n, 8)

    def obs_loss(self, obs_out, b):
        """The next-observation term of Eq. 5: cross-entropy of the agent's next cell (grid), squared error (ant)."""
        if self.task == "grid":                                                  # target -1: padding
            return F.cross_entropy(obs_out.flatten(0, 1), b["next_obs"].flatten(), ignore_index=-1)
        return ((obs_out - b["next_obs"]) ** 2).mean(-1)[b["mask"]].mean()

    # forward() cut in two at layer l (Alg. 1-2: lower_blocks, upper_blocks): the metacontroller reads e_{t,l} =
    # lower(o_{1:t}) and writes e + U e into upper(); a controller at l never changes e_{t,l}.
    def lower(self, obs, layer: int):
        """obs (B, T, 13) -> e_{t,layer} (B, T, D): the embedding and blocks 1..layer."""
        x, objs = self.embed(obs)                                                # e_{t,0}   (B, T, D)
        for block in self.blocks[:layer]:  # no controller below ``layer``
            x = block(x, self.buckets, None, objs)
        return x                                                                 # e_{t,layer} (B, T, D)

    def upper(self, x, layer: int, obs):
        """Residual at ``layer`` (B, T, D) -> action outputs (B, T, 4; the ant: 8): blocks layer+1..L (``obs``: objects)."""
        objs = self.embed(obs)[1] if any(b.obj_attn is not None for b in self.blocks[layer:]) else None
        for block in self.blocks[layer:]:
            x = block(x, self.buckets, None, objs)
        return self.action_head(self.ln_f(x))                                    # (B, T, 4)

# ---------------------------------------------------------------------------------------------------
# 5. Rollouts: the frozen model, optionally controlled, acting in the env
# At step t the model sees o_{1:t}, a_t is sampled from p(a_t | o_{1:t}) and the env returns o_{t+1}; n envs step side
# by side. Each attention layer keeps the past keys and values (a KV cache): a step computes only the new token.
@torch.no_grad()
def rollout(model: GPT, tasks: list, n: int, seed: int, device, ctrl_fn=None, ctrl_layer: int = -1,
            record: bool = False) -> dict:
    """n episodes in lock-step, episode i on env seed ``seed + i`` and task ``tasks[i % len(tasks)]``; ``ctrl_fn(x, g)``:
    a controller at ``ctrl_layer``, told the true subgoals g (n, 1). Returns the mean ``success`` and ``colours`` and the
    ``visited`` colours per episode; with ``record`` (RL) also ``obs`` (n, T, 13), ``actions``, ``lengths``, ``rewards``."""
    E = env_module(model.task)                      # env classes, not gymnasium's vector envs: no autoreset
    envs = [(E.GridPinpadEnv if model.task == "grid" else E.AntPinpadEnv)(max_steps=E.MAX_STEPS) for _ in range(n)]
    resets = [env.reset(seed=seed + i, options={"task": tasks[i % len(tasks)]}) for i, env in enumerate(envs)]
    infos = [info for _, info in resets]                               # per env: its last info (the true subgoal)
    inputs = [env.cells() if model.task == "grid" else obs for env, (obs, _) in zip(envs, resets)]   # o_t, model's form
    gen = torch.Generator(device=device).manual_seed(seed)   # its own generator: evaluating shifts no training
    cache, alive, steps = [{} for _ in model.blocks], np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64)
    seen, taken = [], []                                                   # inputs and actions, for ``record``
    for _ in range(E.MAX_STEPS):
        x = torch.tensor(np.array(inputs), device=device)[:, None]                     # (n, 1, 13)
        g = torch.tensor([info["subgoal"] for info in infos], device=device)[:, None]   # (n, 1)
        ctrl = None if ctrl_fn is None else (lambda e: ctrl_fn(e, g))          # told the true subgoal (analysis)
        act_out, _, _ = model(x, ctrl, ctrl_layer, cache)                               # (n, 1, 4)
        acts = model.sample(act_out[:, 0], gen)                                         # (n,) or (n, 8)
        seen.append(x[:, 0])                                                            # (n, 13) or (n, 41)
        taken.append(acts)
        acts = acts.tolist() if model.task == "grid" else acts.cpu().numpy()
        for i, env in enumerate(envs):
            if alive[i]:                 # finished episodes keep feeding their last observation (ignored)
                obs, _, term, trunc, infos[i] = env.step(acts[i])
                inputs[i] = env.cells() if model.task == "grid" else obs
                steps[i] += 1                                                             # lengths, for ``record``
                alive[i] = not (term or trunc)
        if not alive.any():
            break
    visited = [env.progress for env in envs]
    out = {"success": float(np.mean([env.success for env in envs])), "colours": float(np.mean(visited)), "visited": visited}
    if record:
        out.update(obs=torch.stack(seen, 1), actions=torch.stack(taken, 1),                # (n, T, 13), (n, T)
                   lengths=torch.tensor(steps, device=device),                             # (n,)
                   rewards=torch.tensor([float(env.success) for env in envs], device=device))  # (n,)
    return out

# ---------------------------------------------------------------------------------------------------
# 6. Stage "pretrain": next-action prediction                                           [Eq. 5, App. C.1]
#     L(theta) = sum_t [ -ln p(a_t | o_{1:t}) - lambda ln p(o_{t+1} | o_{1:t}) ]                   (Eq. 5)
# Nothing here mentions subgoals: no task label, no reward. To predict the expert's next move the model must infer in
# context which colour it is heading for, from the colours visited (the pair rule: after colour 2k comes 2k+1; which
# pair comes next depends on the task). The paper's claim: this latent "current subgoal" sits linearly in the mid-
# depth residual stream (section 7) and can be steered (section 8); action_metrics() shows whether it tracks the task.
@torch.no_grad()
def action_metrics(model: GPT, episodes: list, device) -> dict:
    """Held-out action NLL; on the grid also the accuracy and the pair rule: how often the argmax is optimal on steps
    heading to a pair's *first* colour (``opt_acc_ambiguous``: the next pair is at best partly known from the history)
    and to its *second* (``opt_acc_pair``: set by the colour just visited). A model tracking the task: pair >> ambiguous."""
    model.eval()
    nll, n, acc, hit = 0.0, 0, 0, {0: [0, 0], 1: [0, 0]}                   # parity -> [optimal argmax, steps]
    for b in batches_of(episodes, 256 if model.task == "grid" else 32, device):
        act_out, m = model(b["obs"])[0], b["mask"]                                     # (B, T, 4), (B, T)
        n += int(m.sum())                                                                # real steps
        if model.task == "ant":
            nll -= model.action_logp(act_out, b["actions"])[m].sum().item()
            continue
        nll += F.cross_entropy(act_out[m], b["actions"][m], reduction="sum").item()       # summed over real steps
        pred = act_out.argmax(-1)                                                         # (B, T) the greedy action
        acc += int((pred == b["actions"])[m].sum())
        opt = b["optimal"].gather(-1, pred[..., None])[..., 0]                       # (B, T) argmax optimal?
        for parity in (0, 1):                                                          # heading to colour 2k / 2k+1
            mm = m & (b["next_colour"] % 2 == parity)
            hit[parity][0] += int(opt[mm].sum())
            hit[parity][1] += int(mm.sum())
    model.train()
    return {"nll": nll / n} if model.task == "ant" else {"nll": nll / n, "acc": acc / n,
            "opt_acc_ambiguous": hit[0][0] / max(hit[0][1], 1), "opt_acc_pair": hit[1][0] / max(hit[1][1], 1)}

def lr_factor(step: int, args: Args) -> float:
    """Linear warm-up, constant (as Table A4), then a linear cool-down to 0 over the last ``cooldown`` fraction."""
    cool = args.cooldown * args.pretrain_steps
    left = (args.pretrain_steps - step) / cool if cool > 0 else 1.0
    return min(1.0, (step + 1) / max(args.warmup, 1), left)

def pretrain(args: Args, data: dict, device, log: Logger) -> dict:
    """Train the base model from scratch on expert batches (grid: fresh ones; ant: drawn from the stored D).
    Returns the checkpoint: the weights ``model`` and the ``metrics``."""
    torch.manual_seed(args.seed)
    model = GPT(args).to(device)
    decay = [p for name, p in model.named_parameters() if name != "log_std"]    # (decay would pull the ant's std to 1)
    groups = [{"params": decay}] + ([{"params": [model.log_std], "weight_decay": 0.0}] if args.task == "ant" else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    rng, curve, n_params = data["train_rng"], [], sum(p.numel() for p in model.parameters())
    draw = (lambda n: generate_episodes(rng, n, gw.PRETRAIN_TASKS, args.epsilon)) if args.task == "grid" \
        else sample_from(rng, data["train"])                        # grid: fresh episodes, never reused; ant: the stored D
    n, size = args.batch_size * args.bucket_batches, args.batch_size                     # n episodes bucketed at once
    make = lambda: buckets(draw(n), rng, size)
    if args.fast_expert:            # the vectorised expert (the same law), made and bucketed ahead by worker processes
        make = gw.ExpertPool(rng.integers(2 ** 62), n, gw.PRETRAIN_TASKS, args.epsilon, args.workers,
                             functools.partial(buckets, size=size))
    log("6 pretrain", f"{n_params / 1e6:.2f}M parameters, {args.pretrain_steps} steps of {args.batch_size} episodes "
        + ("(fresh)" if args.task == "grid" else f"(from {len(data['train'])} stored)"))
    stream = bucketed_batches(make, device)
    t0, t_log, tokens, waited = time.time(), time.time(), 0, 0.0      # t0, t_log: shifted by evaluation pauses (below)
    for step in range(1, args.pretrain_steps + 1):
        t_wait, b = time.time(), next(stream)
        waited += time.time() - t_wait                        # seconds waiting for batches (made, copied to device)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step - 1, args)
        act_out, obs_out, _ = model(b["obs"])                                             # (B, T, 4), (B, T, 49)
        loss_a = model.action_nll(act_out, b["actions"], b["mask"])                  # -ln p(a_t | o_{1:t})
        loss_o = model.obs_loss(obs_out, b)                                           # -ln p(o_{t+1} | o_{1:t})
        loss = loss_a + args.obs_coef * loss_o                                        # ALGO LOGIC: Eq. 5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)   # rare spikes early in training
        check_finite("6 pretrain", step, "lr", args, loss=loss.item(), gradient_norm=gnorm.item())
        opt.step()
        tokens += int(b["mask"].sum())
        if step % args.log_every == 0 or step == args.pretrain_steps:
            log("6 pretrain", f"step {step}/{args.pretrain_steps} | loss {loss_a.item():.3f} | obs {loss_o.item():.3f} | "
                f"{tokens / (time.time() - t_log) / 1e3:.1f}k tok/s, {waited / (time.time() - t0):.0%} waiting for data | "
                f"{eta(t0, step, args.pretrain_steps)}", step=step, loss=loss_a.item())
            tokens, t_log = 0, time.time()
        if step % args.eval_every == 0 or step == args.pretrain_steps:
            te = time.time()
            m = action_metrics(model, data["heldout"], device)
            curve.append({"step": step, "minutes": (time.time() - t0) / 60, **m})
            fit = "" if args.task == "ant" else (f" | acc {m['acc']:.3f} | optimal-action acc ambiguous "
                                                 f"{m['opt_acc_ambiguous']:.3f} / pair-determined {m['opt_acc_pair']:.3f}")
            log("6 pretrain", f"eval step {step} | held-out nll {m['nll']:.3f}{fit} ({time.time() - te:.0f}s)", **curve[-1])
            t0, t_log = t0 + time.time() - te, t_log + time.time() - te             # evaluation is not training time
            if 0 < 60 * args.pretrain_minutes < time.time() - t0:                  # --pretrain-minutes: stop here
                break
    m = {{"nll": "heldout_nll", "acc": "heldout_acc"}.get(k, k): v for k, v in curve[-1].items() if k not in ("step", "minutes")}
    return {"model": model.state_dict(), "metrics": {"steps": step, "episodes": step * args.batch_size, **m,
            "train_time_s": time.time() - t0, "data_wait_fraction": waited / (time.time() - t0), "n_params": n_params,
            "curve": curve}}                                                       # the last step is always evaluated

# ---------------------------------------------------------------------------------------------------
# 7. Stage "probe": linear probes of the current subgoal                   [Eq. 6-7, Fig. 3/A1, App. C.2]
# Is the current subgoal g_t (the colour pair being worked on) *linearly* readable from e_{t,l}? Per layer we fit
# p(g_t = g | e_{t,l}) = softmax(W_l e_{t,l} + b_l)_g (Eq. 6-7) on held-out D* episodes, scored on others (split by
# episode). The paper sees ~0.3 at the input rise to ~0.5 mid-depth (Fig. A1).
# The label is the subgoal's identity, not its index in the task (a public re-implementation's bug). Compare
# with layer 0: the agent-centred input reads the subgoal above chance, as the agent is usually near its target.
@torch.no_grad()
def residual_features(model: GPT, episodes: list, device) -> tuple:
    """Residuals of every real step at every layer and their subgoal labels: ([L+1 x (M, D)], (M,)), M steps."""
    model.eval()
    feats, labels = [[] for _ in range(model.n_layer + 1)], []                 # per layer: (n_real, D) chunks
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
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-5       # standardise (train stats): one lr fits every layer, still linear
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd                                       # (M, D) each
    probe = nn.Linear(x_tr.shape[1], int(max(y_tr.max(), y_te.max())) + 1).to(x_tr.device)  # one output per subgoal id
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x_tr), y_tr)                                         # -ln p(g_t | e_{t,l}) (Eq. 7)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((probe(x_te).argmax(-1) == y_te).float().mean())

def probe_all(model: GPT, episodes: list, layers: list, device, steps: int, lr: float) -> list:
    """Held-out probe accuracy at each layer; episodes split in halves (by episode, never by step)."""
    half = len(episodes) // 2
    f_tr, y_tr = residual_features(model, episodes[:half], device)                        # [L+1 x (M, D)], (M,)
    f_te, y_te = residual_features(model, episodes[half:], device)
    with torch.random.fork_rng():          # probes must not shift the caller's random stream
        torch.manual_seed(0)
        return [train_probe(f_tr[l], y_tr, f_te[l], y_te, steps, lr) for l in layers]

def probe_stage(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """A probe at every layer 0..L; returns the checkpoint {"metrics"}."""
    t0, mid = time.time(), args.n_layer // 2
    acc = probe_all(model, data["dstar_heldout"][:args.n_probe], list(range(args.n_layer + 1)), device, args.probe_steps, args.probe_lr)
    log("7 probe", "held-out subgoal accuracy by layer (chance 0.25): " + " ".join(f"{a:.3f}" for a in acc))
    log("7 probe", f"gap layer {mid} - layer 0 = {acc[mid] - acc[0]:+.3f} ({time.time() - t0:.0f}s)")
    return {"metrics": {"probe_accuracy": acc, "probe_gap_mid": acc[mid] - acc[0], "train_time_s": time.time() - t0}}

# ---------------------------------------------------------------------------------------------------
# 8. Stage "controllers": ground-truth residual-stream controllers    [Eq. 1, Fig. 4, App. C.3, Table A7]
# Probing says the information is there; control asks whether the model *uses* it. Eq. 1 inserts a linear
# controller at layer l, e_{t,l} <- e_{t,l} + U_t e_{t,l}, and blocks l+1..L process the edited stream as if
# nothing happened. One controller per subgoal g, low-rank as in LoRA: U^(g) = A_g B_g^T, A_g, B_g in R^{D x r}
# (the ant: full rank, Table A8); the true subgoal picks U_t = U^(g_t), trained on D* (Table A7). If U can *steer*
# the frozen model, switching controllers in the right order should solve subgoal orders pretraining never showed.
# Evaluation counts successes on the pretraining tasks (does it steer?) and on the post-training task
# 0-1-2-3-4-5-6-7-0-1-2-3 (does steering compose into an unseen order?). The paper finds L/2 best (Fig. 4).
class SubgoalControllers(nn.Module):
    """G controllers (low-rank; the ant: full rank), picked per step by the subgoal g (B, T); A starts at 0 (U = 0:
    the identity)."""
    def __init__(self, G: int, D: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(G, D, rank))                           # (G, D, r)
        self.B = nn.Parameter(torch.randn(G, D, rank) / math.sqrt(D))            # (G, D, r)

    def forward(self, x, g):
        """x (B, T, D), g (B, T) -> U^(g_t) x_t (B, T, D): all G controllers' B^T x, keep the picked one, apply A."""
        onehot = F.one_hot(g, self.A.shape[0]).to(x.dtype)                       # (B, T, G)
        coef = torch.einsum("btd,gdr->btgr", x, self.B) * onehot[..., None]      # B_g^T x   (B, T, G, r)
        return torch.einsum("btgr,gdr->btd", coef, self.A)                       # ALGO LOGIC: U_t x = A_g B_g^T x

def train_controllers(args: Args, model: GPT, layer: int, episodes: list, device, log: Logger) -> SubgoalControllers:
    """Minimise sum_t -ln p(a_t | o_{1:t}, g_t) on D*; the base model is frozen, so gradients reach only A and B."""
    model.requires_grad_(False).eval()
    torch.manual_seed(args.seed + 100 + layer)   # B's draw depends on this layer alone, not on the layers run before
    ctrl = SubgoalControllers(env_module(args.task).N_SUBGOALS, args.n_embd, args.ctrl_rank or args.n_embd).to(device)
    opt = torch.optim.AdamW(ctrl.parameters(), lr=args.ctrl_lr, weight_decay=args.weight_decay)
    rng, t0 = np.random.default_rng(args.seed + 100 + layer), time.time()
    for step in range(1, args.ctrl_steps + 1):
        idx = rng.integers(len(episodes), size=args.ctrl_batch)  # a batch of ``episodes``, with replacement
        b = collate([episodes[i] for i in idx], device)
        g = b["subgoals"].clamp(min=0)                                           # padding -> any id (masked)
        act_out, _, _ = model(b["obs"], lambda x: ctrl(x, g), layer)             # Eq. 1 at ``layer``
        loss = model.action_nll(act_out, b["actions"], b["mask"])                # -ln p(a_t | o_{1:t}, g_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite("8 controllers", step, "ctrl-lr", args, loss=loss.item())
        opt.step()
        if step % args.log_every == 0 or step == args.ctrl_steps:
            log("8 controllers", f"layer {layer} step {step}/{args.ctrl_steps} | nll {loss.item():.3f} | "
                f"{eta(t0, step, args.ctrl_steps)}", layer=layer, step=step, nll=loss.item())
    return ctrl

def controller_stage(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """Controllers at each layer of --ctrl-layers (Fig. 4's x-axis), beside the base model alone (which can only guess
    the task: a perfect pair rule succeeds in ~1/16 of episodes). The checkpoint: ``metrics``, ``controllers``."""
    t0, post_task = time.time(), env_module(args.task).POSTTRAIN_TASK
    n_post, ev = len(post_task), dict(n=args.n_eval, device=device)
    def evaluate(**kw):                          # the fixed evaluation: pretraining tasks, post-training task
        return (rollout(model, env_module(args.task).PRETRAIN_TASKS, seed=data["eval_seed"], **ev, **kw),
                rollout(model, [post_task], seed=data["eval_seed"] + 10 ** 6, **ev, **kw))
    base_pre, base_post = evaluate()
    log("8 controllers", f"base model alone: success pretraining tasks {base_pre['success']:.3f}, "
        f"post-training task {base_post['success']:.3f} ({base_post['colours']:.1f} of {n_post} colours)")
    layers, pre, post, states = ctrl_layers(args), {}, {}, {}
    for i, l in enumerate(layers):
        ctrl = train_controllers(args, model, l, data["dstar_train"], device, log)
        pre[l], post[l] = (r["success"] for r in evaluate(ctrl_fn=ctrl, ctrl_layer=l))
        states[str(l)] = ctrl.state_dict()
        log("8 controllers", f"layer {l}: success pretraining tasks {pre[l]:.3f} | post-training task {post[l]:.3f} | "
            f"{eta(t0, i + 1, len(layers))}", layer=l, pretrain=pre[l], posttrain=post[l])
    metrics = {"base_success": base_post["success"], "base_success_pretrain": base_pre["success"],
               "controller_success": [post.get(l) for l in range(args.n_layer + 1)],      # None: not trained
               "controller_success_pretrain": [pre.get(l) for l in range(args.n_layer + 1)],
               "controller_success_oracle": None, "controller_success_oracle_pretrain": None}   # the diagnostic below
    # A diagnostic (grid; not the paper's protocol, which trains on D* only): controllers at L/2 trained on half of
    # D* alternated with as many post-training expert episodes. If these steer the novel order where the D* ones do
    # not, a linear edit at L/2 *can* steer there; what fails is the transfer from D*, which never shows a subgoal
    # the history rules out.
    mid = args.n_layer // 2
    if args.ctrl_oracle and args.task == "grid" and mid in post:
        n = args.n_dstar // 2
        rng = np.random.default_rng(np.random.SeedSequence(args.seed).spawn(6)[5])   # a stream no other set uses
        extra = generate_episodes(rng, n, [gw.POSTTRAIN_TASK], 0.0)
        mixed = [ep for pair in zip(data["dstar_train"][:n], extra) for ep in pair]                 # alternating
        ctrl = train_controllers(args, model, mid, mixed, device, log)
        o_pre, o_post = (r["success"] for r in evaluate(ctrl_fn=ctrl, ctrl_layer=mid))
        metrics.update(controller_success_oracle=o_post, controller_success_oracle_pretrain=o_pre)
        log("8 controllers", f"layer {mid}, diagnostic (not the protocol), trained on D* + post-training episodes: "
            f"success pretraining tasks {o_pre:.3f} | post-training task {o_post:.3f}", controller_success_oracle=o_post)
    return {"metrics": {**metrics, "train_time_s": time.time() - t0}, "controllers": states}

# ---------------------------------------------------------------------------------------------------
# 9. The RL toolkit and token-level RL                                                 [App. C.5.2-C.5.3]
# The post-training task (0-1-2-3-4-5-6-7-0-1-2-3; the ant: 0-1-2-3) pays 1 when all its colours are visited in
# order, else 0. Its subgoal order A-B-C-D-A-B uses only transitions that pretraining never shows, over twice as
# many steps. Both RL methods use the same update (App. C.5.2): a PPO-style clipped ratio, no critic, and one
# advantage per *trajectory*,
#
#     A_tau = (R(tau) - mean_B R) / (std_B R + 1e-3)                     (population std over the batch)
#     L = -(1/N) sum_tau sum_t min( rho_t A_tau, clip(rho_t, 1 - eps, 1 + eps) A_tau ),   N = the batch's actions
#     rho_t = pi(act_t | s_{1:t}) / pi_old(act_t | s_{1:t}),
#
# like GRPO without groups. The methods differ only in *what an action is* (the lines marked # ALGO LOGIC):
#   token-level RL: act_t = the primitive move a_t at every env step, pi = the whole base model (finetuned);
#   internal RL:    act_k = the code z at the k-th switch only, pi = a small causal policy over z; the base
#                   model and the metacontroller's decoder are part of the environment (section 10 defines
#                   z, the switch and the decoder; section 11 is this loop over them).
# Token-level RL starts from the pretrained model, which on this task essentially never succeeds (App. C.5.3:
# about once in a million episodes); with no success in a batch every advantage is 0 and nothing is learned.
def trajectory_advantage(rewards):
    """A_tau = (R - mean_B R) / (std_B R + 1e-3) (App. C.5.2): one number per episode (B,)."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-3)       # ALGO LOGIC: (B,)

def ppo_loss(logp, logp_old, adv, mask, clip: float):
    """-mean over the batch's actions of min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - logp_old);
    logp, logp_old, mask (B, T'); adv (B,), broadcast to each episode's actions (not adv[0] for all: a public bug)."""
    ratio = torch.exp(logp - logp_old)                                             # (B, T')  rho
    a = adv[:, None]                                                               # (B, 1)   A_tau
    obj = torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)                # ALGO LOGIC: clipped surrogate
    return -(obj * mask).sum() / mask.sum().clamp(min=1)

def step_mask(lengths, T: int):
    """(B,) lengths -> (B, T) float mask of the real steps."""
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).float()

def rl_train(args: Args, tag: str, collect, logp_fn, params, lr_flag: str, seed: int, log: Logger) -> dict:
    """The shared RL loop (Alg. 3): collect B episodes with the current policy, one advantage per episode, ``rl_epochs``
    full-batch steps on the clipped objective (lr: the setting ``lr_flag``), until ``rl_episodes`` are used. ``collect(n,
    seed)``: a batch with ``rewards`` (B,), ``mask`` (B, T') and what ``logp_fn(batch)`` reads for its (B, T') log-probs."""
    opt = torch.optim.AdamW(params, lr=getattr(args, lr_flag.replace("-", "_")), weight_decay=0.0)   # Table A13: wd 0
    curve, episodes, t0 = [], 0, time.time()
    n_batches = math.ceil(args.rl_episodes / args.rl_batch)  # every method: the same budget
    for it in range(1, n_batches + 1):
        batch = collect(args.rl_batch, seed + episodes)          # fresh env seeds for every episode
        episodes += args.rl_batch
        R = batch["rewards"]                                                              # (B,) R(tau) in {0, 1}
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
    """The final test's numbers, logged and added to the training metrics ``m`` of the RL stage ``name``."""
    m.update(success=test["success"], colours=test["colours"], train_time_s=time.time() - t0)
    if "expert" in data:             # the ant: relative to the expert, as the paper's Fig. 8 does
        m["success_normalised"] = test["success"] / max(data["expert"]["posttrain"], 1e-9)
    log(f"{CHECKPOINTS[name][0]} {name}", f"final test on {args.rl_eval} post-training episodes (unseen env seeds): "
        f"success {test['success']:.3f} | {test['colours']:.1f} of {len(env_module(args.task).POSTTRAIN_TASK)} "
        f"colours | trained on {m['episodes']} episodes in {m['train_time_s']:.0f}s", success=test["success"])
    return m

def token_rl(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """Token-level RL: finetune a copy of the base model on primitive actions (App. C.5.3), then test it on unseen
    env seeds. Returns the checkpoint: the ``metrics`` and the finetuned ``policy``."""
    t0, post = time.time(), env_module(args.task).POSTTRAIN_TASK
    policy = copy.deepcopy(model).requires_grad_(True)     # the frozen original stays untouched
    def collect(n, s):
        r = rollout(policy, [post], n, s, device, record=True)
        return {**r, "mask": step_mask(r["lengths"], r["actions"].shape[1])}              # (B, T) steps taken
    logp_fn = lambda b: policy.action_logp(policy(b["obs"])[0], b["actions"])   # ALGO LOGIC: act = a_t, every step
    m = rl_train(args, "9 token_rl", collect, logp_fn, list(policy.parameters()), "token-lr",
                 data["eval_seed"] + 3 * 10 ** 6, log)
    test = rollout(policy, [post], args.rl_eval, data["eval_seed"] + 2 * 10 ** 6, device)    # env seeds unused so far
    return {"metrics": rl_report(args, "token_rl", m, test, data, log, t0), "policy": policy.state_dict()}

# ---------------------------------------------------------------------------------------------------
# 10. Stage "metacontroller": discovering subgoals and when to switch  [Eq. 2-3, App. C.4, D.2, Table A9]
# Section 8 needed the true subgoal labels. The metacontroller finds controllers *and* their timing without them,
# self-supervised on D*: it reads the frozen model's e_t = e_{t,L/2} and writes a controller back there (App. D.2):
#   s      = f_emb(e_{1:T})                     non-causal sequence embedding (sees the future)      (Eq. 13)
#   h_t    = GRU(e_t, h_{t-1})                  the history so far                                   (Eq. 12)
#   mu_t, Sigma_t = f_enc(e_t, h_{t-1}, s);  z~_t ~ N(mu_t, Sigma_t)   a proposed new code       (Eq. 14-15)
#   beta_t = f_switch(e_t, h_{t-1}, z_{t-1})    the switching unit, in [0, 1]; s only via z_{t-1}    (Eq. 16)
#   z_t    = beta_t z~_t + (1 - beta_t) z_{t-1}  temporal integration                                 (Eq. 2)
#   U_t    = f_hyp(z_t) = A(z_t) B(z_t)^T       the hypernetwork decoder, rank r (the ant: D)        (Eq. 18)
#   e_t   <- e_t + U_t e_t                      then the frozen upper blocks predict a_t             (Eq. 11)
# Loss (Eq. 3 with lambda = 0):  sum_t [ -ln p(a_t | o_{1:t}, z_{1:t}) + alpha KL(N(mu_t, Sigma_t) || N(0, I)) ].
# The KL is charged at *every* step, not weighted by beta (App. E.1; weighting it by beta is a bug a public
# re-implementation shipped). Switching comes out sparse because a proposal that beta ignores can sit at the prior
# for free: one code per subgoal, sent at its start, buys its NLL for a few nats; alpha sets the trade-off (Fig. 7).
# Shapes: e (B, T, D) = e_{t,L/2} on D*; s (B, H); h (B, T, H); mu, logvar, z (B, T, Z); beta (B, T), beta_1 = 1 (the
# first step always picks a code); A, B (B, T, D, r). The forced ablation (App. C.4.1): beta_t = 1 at every step.
def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) summed over the last axis (the alpha term of Eq. 3)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)                        # ALGO LOGIC: closed form

class MetaController(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        D, Z, H, E, r = args.n_embd, args.n_z, args.mc_hidden, args.mc_enc_hidden, args.ctrl_rank or args.n_embd
        self.D, self.r, self.gumbel = D, r, args.mc_gumbel
        # f_emb: a bidirectional GRU, its outputs averaged over the real steps (our choice: the paper does not say)
        self.embedder = nn.GRU(D, H, batch_first=True, bidirectional=True)                # Eq. 13
        self.emb_out = nn.Linear(2 * H, H)
        self.history = nn.GRU(D, H, batch_first=True)                                    # Eq. 12
        self.encoder = nn.Sequential(nn.Linear(D + H + H, E), nn.ReLU(), nn.Linear(E, 2 * Z))  # Eq. 14
        self.switch = nn.Sequential(nn.Linear(D + H + Z, E), nn.ReLU(), nn.Linear(E, 1))       # Eq. 16
        self.decoder = nn.Sequential(nn.Linear(Z, H), nn.ReLU(), nn.Linear(H, 2 * D * r))      # Eq. 18
        last = self.decoder[2]         # LoRA-style start: its A half exactly 0 (U = 0), its B half random (so U moves)
        with torch.no_grad():
            last.weight[:D * r], last.bias[:D * r] = 0.0, 0.0
            last.weight[D * r:].normal_(0, 0.02)
            last.bias[D * r:].normal_(0, 1 / math.sqrt(D))

    def factors(self, z):
        """z (..., Z) -> A, B (..., D, r): the low-rank controller U = A B^T = f_hyp(z) (Eq. 18)."""
        return self.decoder(z).unflatten(-1, (2, self.D, self.r)).unbind(-3)             # (..., D, r) each

    def apply(self, z, e):
        """U(z_t) e_t at every step: z (B, T, Z), e (B, T, D) -> (B, T, D), never forming the D x D matrix U."""
        A, B = self.factors(z)                                                           # (B, T, D, r) each
        return (A @ (B.transpose(-1, -2) @ e[..., None]))[..., 0]                        # U_t e_t = A (B^T e) (Eq. 11)

    def switch_prob(self, e, h_prev, z_prev, noisy: bool = False):
        """beta_t (Eq. 16), causal, no access to s: (B, D), (B, H), (B, Z) -> (B,). ``noisy`` (--mc-gumbel > 0): a
        Gumbel-sigmoid sample sigmoid((logit + logistic noise) / tau), which pushes the gate towards 0 or 1."""
        logit = self.switch(torch.cat([e, h_prev, z_prev], -1))[..., 0]                  # (B,) Eq. 16
        if noisy and self.gumbel > 0:
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = (logit + torch.log(u) - torch.log1p(-u)) / self.gumbel
        return torch.sigmoid(logit)                                                      # ALGO LOGIC: switching gate

    def sequence_embedding(self, e, lengths):
        """s = f_emb(e_{1:T}) (B, H) (Eq. 13): the non-causal part (every step of the episode, the future included)."""
        packed = nn.utils.rnn.pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.embedder(packed)  # both directions, real steps only
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=e.shape[1])  # (B, T, 2H)
        mask = step_mask(lengths, e.shape[1])[..., None]                                  # (B, T, 1)
        return self.emb_out((out * mask).sum(1) / lengths[:, None].float())             # (B, H)

    def forward(self, e, lengths, forced: bool = False, sample: bool = True):
        """e (B, T, D) -> z (B, T, Z), kl (B, T), beta (B, T). ``forced``: beta = 1 at every step (the ablation)."""
        B, T, _ = e.shape
        s = self.sequence_embedding(e, lengths)                                          # (B, H)
        h, _ = self.history(e)                                                           # (B, T, H) Eq. 12
        h_prev = torch.cat([h.new_zeros(B, 1, h.shape[-1]), h[:, :-1]], 1)              # (B, T, H) h_{t-1}, h_0 = 0
        stats = self.encoder(torch.cat([e, h_prev, s[:, None].expand(B, T, s.shape[-1])], -1))
        mu, logvar = stats.chunk(2, -1)                                                  # (B, T, Z) Eq. 14
        logvar = logvar.clamp(-10, 5)  # log Sigma_t (B, T, Z), kept in a sane range
        z_tilde = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu  # Eq. 15, reparameterised
        kl = gaussian_kl(mu, logvar)                                                     # (B, T) charged at every step
        if forced:                          # ALGO LOGIC: Eq. 2 with beta = 1 (the ablation): z_t = z~_t
            return z_tilde, kl, e.new_ones(B, T)
        z, zs, betas = e.new_zeros(B, mu.shape[-1]), [], []  # z_0 = 0; z_t and beta_t per step
        # the only sequential part, beta_t = f_switch(e_t, h_{t-1}, z_{t-1}): h_t below is h_prev[:, t] = h_{t-1}
        for t, (e_t, h_t, zt_t) in enumerate(zip(e.unbind(1), h_prev.unbind(1), z_tilde.unbind(1))):
            beta = e.new_ones(B) if t == 0 else self.switch_prob(e_t, h_t, z, noisy=sample)   # (B,)
            z = beta[:, None] * zt_t + (1 - beta[:, None]) * z                         # ALGO LOGIC: Eq. 2 (B, Z)
            zs.append(z)
            betas.append(beta)
        return torch.stack(zs, 1), kl, torch.stack(betas, 1)                            # (B, T, Z), (B, T), (B, T)

def mc_loss(model: GPT, mc: MetaController, b: dict, layer: int, alpha: float, forced: bool = False):
    """Eq. 3 with lambda = 0 on a D* batch: action NLL through the frozen model + alpha * the mean per-step KL."""
    e = model.lower(b["obs"], layer)           # (B, T, D); a controller never changes e_{t,l}; frozen base: no graph
    lengths = b["mask"].sum(1)                                                           # (B,)
    z, kl, beta = mc(e, lengths, forced)
    act_out = model.upper(e + mc.apply(z, e), layer, b["obs"])                           # ALGO LOGIC: Eq. 11, (B, T, 4)
    nll = model.action_nll(act_out, b["actions"], b["mask"])
    mask = step_mask(lengths, e.shape[1])                                                # (B, T)
    kl_mean = (kl * mask).sum() / mask.sum()
    return nll + alpha * kl_mean, nll, kl_mean, beta, mask                              # ALGO LOGIC: Eq. 3

def boundary_f1(beta, subgoals, lengths, tol: int = 1) -> dict:
    """Switches (beta >= 0.5) against true subgoal changes per episode, matched within +-tol steps, each at most once;
    beta, subgoals (B, T) tensors or lists, lengths (B,). Step 1 never counts (every episode starts with a code).
    Returns precision, recall, F1, the switch rate, ``switches`` per episode (step 1's included, as in Fig. 7)."""
    tp = n_pred = n_true = n_steps = 0
    for bt, g, n in zip(*(x.tolist() if torch.is_tensor(x) else x for x in (beta, subgoals, lengths))):
        pred = [t for t in range(1, n) if bt[t] >= 0.5]                                   # switch steps
        true = [t for t in range(1, n) if g[t] != g[t - 1]]  # steps where a new subgoal starts
        used = set()
        for t in true:
            best = min((p for p in pred if abs(p - t) <= tol and p not in used), key=lambda p: abs(p - t), default=None)
            if best is not None:
                used.add(best)
        tp, n_pred, n_true, n_steps = tp + len(used), n_pred + len(pred), n_true + len(true), n_steps + max(n - 1, 0)
    prec, rec = tp / max(n_pred, 1), tp / max(n_true, 1)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-9),
            "switch_rate": n_pred / max(n_steps, 1), "switches": 1 + n_pred / max(len(lengths), 1)}

@torch.no_grad()
def switch_alignment(model: GPT, mc: MetaController, episodes: list, layer: int, device) -> dict:
    """Held-out switch statistics with posterior means (no sampling; beta reads the encoder's z_{t-1}), NLL, KL, traces."""
    betas, subgoals, nll, kl, n = [], [], 0.0, 0.0, 0                   # per episode, real steps only
    for b in batches_of(episodes, 256, device):
        e, m, lengths = model.lower(b["obs"], layer), b["mask"], b["mask"].sum(1)           # e (B, T, D), lengths (B,)
        z, k, beta = mc(e, lengths, sample=False)                                         # posterior means: z~_t = mu_t
        nll -= model.action_logp(model.upper(e + mc.apply(z, e), layer, b["obs"]), b["actions"])[m].sum().item()
        kl, n = kl + k[m].sum().item(), n + int(m.sum())
        betas += [bt[:T] for bt, T in zip(beta.tolist(), lengths.tolist())]                # real steps only
        subgoals += [g[:T] for g, T in zip(b["subgoals"].tolist(), lengths.tolist())]
    out = boundary_f1(betas, subgoals, [len(bt) for bt in betas])
    out.update(nll=nll / n, kl=kl / n, examples=[{"beta": [round(x, 3) for x in betas[i]], "subgoals": subgoals[i]}
                         for i in range(0, len(betas), max(1, len(betas) // 6))][:6])   # for the Fig. 6/A3 plot
    return out

def collapse_verdict(rate: float, kl: float) -> str:
    """Switching in plain words, from the held-out switch rate and KL per step: the ways it fails, or not."""
    if kl < 0.005:
        return "COLLAPSED: it sends nothing (KL ~ 0: a collapsed posterior), so its codes carry no information"
    if rate < 0.01:
        return "COLLAPSED: it never switches after the first step"
    return "COLLAPSED: it switches at (almost) every step" if rate > 0.9 else "sparse switching"

def train_metacontroller(args: Args, model: GPT, episodes: list, device, log: Logger, seed: int, steps: int,
                         forced: bool = False, joint: bool = False) -> MetaController:
    """Minimise Eq. 3 on the D* ``episodes`` for ``steps`` steps from seed ``seed``, the base model frozen; ``joint``
    (the co-trained baseline, App. C.4.2): the base model is trained too, on fresh expert episodes like D*."""
    model.requires_grad_(joint).train(joint)         # frozen: gradients reach only the metacontroller
    torch.manual_seed(seed + (7 if forced else 0))
    mc = MetaController(args).to(device)
    params = list(mc.parameters()) + (list(model.parameters()) if joint else [])         # the trainable parts
    opt = torch.optim.AdamW(params, lr=args.mc_lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(seed + (300 if forced else 200))
    draw = (lambda n: generate_episodes(rng, n, gw.PRETRAIN_TASKS, 0.0)) if joint else sample_from(rng, episodes)
    stream = bucketed_batches(lambda: buckets(draw(args.mc_batch * args.bucket_batches), rng, args.mc_batch), device)
    tag, t0 = "10 metacontroller" + ("-forced" if forced else "-cotrained" if joint else ""), time.time()
    for step in range(1, steps + 1):
        b = next(stream)
        # KL warm-up: with the full alpha at once the posterior collapses (KL -> 0) before the decoder uses anything
        alpha = args.alpha * min(1.0, step / max(1, args.mc_kl_warmup))
        loss, nll, kl, beta, mask = mc_loss(model, mc, b, args.n_layer // 2, alpha, forced)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        check_finite(tag, step, "mc-lr", args, loss=loss.item(), gradient_norm=gnorm.item())
        opt.step()
        if step % args.log_every == 0 or step == steps:
            rate = float(((beta >= 0.5).float() * mask)[:, 1:].sum() / mask[:, 1:].sum())
            log(tag, f"seed {seed} step {step}/{steps} | nll {nll.item():.3f} | kl {kl.item():.3f} | switch rate "
                f"{rate:.3f} | {eta(t0, step, steps)}", seed=seed, step=step, nll=nll.item(), kl=kl.item(),
                switch_rate=rate)
    model.requires_grad_(False).eval()
    return mc

# Do the codes mean something (App. B.3.2, Fig. A4)? Codes z ~ N(0, I), each held for a whole pretraining-task episode
# (the paper: until the switch fires), "name pair q" if their episode completed its first pair, q. On two-pair tasks
# p-g, a code that named g is injected once p is completed, against the model alone on the same layouts and action
# noise (identical until then): how often is g completed next? In distribution p -> g occurs in pretraining; out of
# it g = p + 1 (mod 4), as in the post-training task. The paper (ant): 23% -> 36%; out of distribution 10% -> 24%.
@torch.no_grad()
def code_injection(args: Args, model: GPT, mc: MetaController, data: dict, device) -> dict:
    """Pair-g completion rates [model alone, code injected] in distribution (``in``) and out (``ood``), None where no
    code named a goal; ``codes_per_pair``: how many of the 4 * n_eval prior codes named each pair."""
    mid, n, seed = args.n_layer // 2, args.n_eval, data["eval_seed"] + 4 * 10 ** 6        # env seeds unused elsewhere
    gen = torch.Generator(device=device).manual_seed(args.seed + 13)
    held = lambda z: (lambda x, g: mc.apply(z[:, None], x))                              # U(z) e, one code z (n, Z)
    prior = torch.randn(4 * n, args.n_z, generator=gen, device=device)                   # (4n, Z) z ~ N(0, I)
    visited = rollout(model, gw.PRETRAIN_TASKS, 4 * n, seed, device, held(prior), mid)["visited"]
    named = [prior[[i for i, v in enumerate(visited) if v >= 2 and gw.PRETRAIN_TASKS[i % 16][0] == 2 * q]] for q in range(4)]
    seen = sorted({(t[k] // 2, t[k + 2] // 2) for t in gw.PRETRAIN_TASKS for k in (0, 2)})   # pretraining's p -> g
    out = {"codes_per_pair": [len(c) for c in named]}                                    # named[q]: (n_q, Z)
    for name, pairs in (("in", seen), ("ood", [(p, (p + 1) % 4) for p in range(4)])):
        pairs, out[name] = [(p, g) for p, g in pairs if len(named[g])], None   # None: no code named any goal
        if pairs:
            tasks = [(2 * p, 2 * p + 1, 2 * g, 2 * g + 1) for p, g in pairs]                 # episode i: tasks[i % len]
            goals = [pairs[i % len(pairs)][1] for i in range(n)]                            # episode i's pair g
            z = torch.stack([named[g][torch.randint(len(named[g]), (), generator=gen, device=device)] for g in goals])
            goal = torch.tensor(goals, device=device)[:, None]                            # (n, 1); z (n, Z) names it
            inject = lambda x, g, goal=goal, z=z: (g == goal)[..., None] * held(z)(x, g)   # U(z_g) e once g is the subgoal
            out[name] = [rollout(model, tasks, n, seed + 10 ** 5, device, f, mid)["success"] for f in (None, inject)]
    return out

def metacontroller_stage(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """Train the metacontroller and its beta = 1 ablation, score switching on held-out D*[:n_probe/2], inject codes
    (grid). Returns the checkpoint: the ``metrics`` and both metacontrollers' weights, ``mc`` and ``mc_forced``."""
    t0, mid, held = time.time(), args.n_layer // 2, data["dstar_heldout"][:args.n_probe // 2]
    mc = train_metacontroller(args, model, data["dstar_train"], device, log, args.seed, args.mc_steps)
    al = switch_alignment(model, mc, held, mid, device)
    verdict = collapse_verdict(al["switch_rate"], al["kl"])
    log("10 metacontroller", f"held-out D*: nll {al['nll']:.3f} | kl {al['kl']:.3f} | switch rate "
        f"{al['switch_rate']:.3f} ({verdict}) | switches vs subgoal boundaries (+-1 step): precision "
        f"{al['precision']:.3f} recall {al['recall']:.3f} F1 {al['f1']:.3f}", **al)
    inj = code_injection(args, model, mc, data, device) if args.task == "grid" else None
    if inj is not None:
        log("10 metacontroller", "code injection, pair g completed next (model alone -> code injected): " + " | ".join(
            f"{k} {'n/a' if v is None else f'{v[0]:.3f} -> {v[1]:.3f}'}" for k, v in inj.items() if k != "codes_per_pair"), **inj)
    mc_forced = train_metacontroller(args, model, data["dstar_train"], device, log, args.seed, args.mc_steps, True)
    forced_nll = switch_alignment(model, mc_forced, held, mid, device)["nll"]
    log("10 metacontroller-forced", f"held-out D* nll {forced_nll:.3f} (beta = 1 at every step)")
    metrics = {"switch_f1": al["f1"], "switch_precision": al["precision"], "switch_recall": al["recall"],
               "switch_rate": al["switch_rate"], "switch_collapse": verdict, "mc_nll": al["nll"], "mc_kl": al["kl"],
               "beta_examples": al["examples"], "mc_forced_nll": forced_nll, "injection": inj, "train_time_s": time.time() - t0}
    return {"metrics": metrics, "mc": mc.state_dict(), "mc_forced": mc_forced.state_dict()}

SWEEP_ALPHAS, COTRAIN_ALPHAS, SWEEP_SEEDS, SWEEP_GUMBEL = (0, 0.05, 0.1, 0.17, 0.3, 0.5, 1), (0, 0.1, 0.3, 1), 3, 1.0

def alpha_sweep(args: Args, model: GPT, data: dict, device, log: Logger) -> dict:
    """Rate against distortion (Fig. 7, App. C.6; --sweep alpha): each run's held-out action NLL against its KL per step.
    Frozen base, SWEEP_SEEDS runs per alpha: the paper finds the boundary-aligned runs set apart from lower-rate ones by a
    gap that a wide range of alpha lands on; co-trained (App. C.4.2), one run per COTRAIN_ALPHAS: no gap, mostly one
    switch. "Aligned": F1 >= 0.9 (the paper: by hand); Gumbel-sigmoid beta; then internal RL on the co-trained codes."""
    t0, mid, held = time.time(), args.n_layer // 2, data["dstar_heldout"][:args.n_probe // 2]
    jobs = [("frozen", a, args.seed + 1000 * i) for a in SWEEP_ALPHAS for i in range(SWEEP_SEEDS)] + \
        [("co-trained", a, args.seed) for a in sorted({*COTRAIN_ALPHAS, args.alpha})]
    runs, cotrained = [], None
    for j, (cond, alpha, seed) in enumerate(jobs):
        torch.manual_seed(seed)
        base = model if cond == "frozen" else GPT(args).to(device)              # co-trained: a fresh base model
        steps = args.sweep_steps if cond == "frozen" else args.cotrain_steps
        run_args = dataclasses.replace(args, alpha=alpha, mc_gumbel=SWEEP_GUMBEL, mc_kl_warmup=steps // 5)
        mc = train_metacontroller(run_args, base, data["dstar_train"], device, log, seed, steps, joint=cond != "frozen")
        al = switch_alignment(base, mc, held, mid, device)
        runs.append({"condition": cond, "alpha": alpha, "seed": seed, "nll": al["nll"], "kl": al["kl"],
                     "switches": al["switches"], "f1": al["f1"], "aligned": al["f1"] >= 0.9})
        log("10 sweep", f"{cond} alpha {alpha} seed {seed}: nll {al['nll']:.3f} | kl {al['kl']:.3f} | "
            f"{al['switches']:.2f} switches per episode | F1 {al['f1']:.3f} | {eta(t0, j + 1, len(jobs))}", **runs[-1])
        cotrained = (base, mc) if cond == "co-trained" and alpha == args.alpha else cotrained
    rl = internal_rl(args, *cotrained, data, device, log, forced=False)["metrics"]    # the frozen one's budget
    return {"metrics": {"runs": runs, "cotrained_internal_rl": rl, "sweep_steps": args.sweep_steps,
                        "cotrain_steps": args.cotrain_steps, "train_time_s": time.time() - t0}}

# ---------------------------------------------------------------------------------------------------
# 11. Internal RL: RL in the metacontroller's code space                        [Alg. 1-3, App. C.5, D.3]
# Section 9's loop with a different agent: a causal policy pi(z | e at the decisions so far) replaces the non-causal
# encoder; the base model, history GRU, switching unit and decoder are frozen, part of the env (Alg. 1-2). At step t:
#   e_t = lower_blocks(o_{1:t})                      the frozen model sees the whole history (KV cache)
#   switch if t = 1 or beta_t = f_switch(e_t, h_{t-1}, z_{t-1}) >= 0.5        (binarised, Alg. 2)
#   on a switch: z ~ pi(. | e at this and the earlier switches)              <- the RL action
#   otherwise:   z unchanged, so U = f_hyp(z) unchanged (a temporally-abstract action)
#   a_t ~ upper_blocks(e_t + U e_t); env.step(a_t)
# So the RL "episode" is the handful of switch points (on the grid about 6, if they sit at subgoal boundaries), not
# ~60 primitive steps (App. E.2). The policy starts as the prior N(0, I), the codes the decoder was trained on; the
# forced ablation (beta = 1) draws a new z at every step. Shapes: e_dec (B, N, D), z_dec (B, N, Z) at each episode's N decisions.
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
        """log pi(z_k | e_{t_1..t_k}) for whole decision sequences: (B, N, D), (B, N, Z) -> (B, N)."""
        out, _ = self.gru(e_dec)                                                          # (B, N, irl_hidden)
        return torch.distributions.Normal(self.mu(out), self.log_std.exp()).log_prob(z_dec).sum(-1)

class InternalAgent:
    """The frozen metacontroller parts and the z-policy as a stateful controller for rollout() (Alg. 1-2): called
    once per env step with x = e_{t,L/2} (n, 1, D), it returns U_t x; ``g``, the true subgoal, is never read."""
    def __init__(self, mc: MetaController, policy: ZPolicy, n: int, seed: int, forced: bool):
        self.mc, self.pi, self.forced, self.t = mc, policy, forced, 0
        dev = policy.mu.weight.device
        self.h = torch.zeros(n, mc.history.hidden_size, device=dev)            # h_{t-1} of the history GRU
        self.z = torch.zeros(n, policy.mu.out_features, device=dev)           # z_{t-1}
        self.h_pi = torch.zeros(1, n, policy.gru.hidden_size, device=dev)     # the policy's own state
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.trace = []                                 # per step (decide, e_t, proposed z), for the update

    @torch.no_grad()
    def __call__(self, x, g=None):
        e = x[:, 0]                                                                       # (n, D) e_t
        if self.t == 0 or self.forced:                                   # t = 1, or the beta = 1 ablation
            decide = torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
        else:                                                            # beta_t = f_switch(e_t, h_{t-1}, z_{t-1})
            decide = self.mc.switch_prob(e, self.h, self.z) >= 0.5       # ALGO LOGIC: Heaviside(beta_t - 0.5), (n,)
        out, h_pi = self.pi.gru(e[:, None], self.h_pi)                                  # (n, 1, irl_hidden)
        mu = self.pi.mu(out[:, 0])
        z_new = mu + self.pi.log_std.exp() * torch.randn(mu.shape, generator=self.gen, device=e.device)  # ALGO LOGIC: z ~ pi
        self.z = torch.where(decide[:, None], z_new, self.z)                          # new code only on a switch
        self.h_pi = torch.where(decide[None, :, None], h_pi, self.h_pi)               # the policy advances only then
        self.trace.append((decide, e, z_new))
        _, h = self.mc.history(e[:, None], self.h[None])                               # h_t = GRU(e_t, h_{t-1})
        self.h, self.t = h[0], self.t + 1
        return self.mc.apply(self.z[:, None], x)                                        # U_t e_t (n, 1, D)

    def decisions(self, lengths):
        """Compact each episode's decision points into (n, N) sequences: e_dec, z_dec, mask."""
        dec, e, z = (torch.stack(x, 1) for x in zip(*self.trace))                       # (n, T), (n, T, D), (n, T, Z)
        dec = dec & (step_mask(lengths, dec.shape[1]) > 0)                                # real steps only
        pad = lambda xs: nn.utils.rnn.pad_sequence(xs, batch_first=True)                  # ragged -> (n, N, ...)
        return (pad([e[i, dec[i]] for i in range(len(e))]), pad([z[i, dec[i]] for i in range(len(z))]),
                pad([torch.ones(int(d.sum()), device=e.device) for d in dec]))

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
        r = rollout(model, [post], n, s, device, ctrl_fn=agent, ctrl_layer=mid, record=True)
        e_dec, z_dec, mask = agent.decisions(r["lengths"])                              # the recorded decisions, padded (n, N)
        return {"rewards": r["rewards"], "e": e_dec, "z": z_dec, "mask": mask}
    logp_fn = lambda b: policy.log_prob(b["e"], b["z"])                                  # ALGO LOGIC: log pi(z | e)
    m = rl_train(args, f"11 {name}", collect, logp_fn, list(policy.parameters()), "irl-lr",
                 data["eval_seed"] + 3 * 10 ** 6, log)
    test_seed = data["eval_seed"] + 2 * 10 ** 6                                         # env seeds unused so far
    agent = InternalAgent(mc, policy, args.rl_eval, test_seed + 1, forced)
    test = rollout(model, [post], args.rl_eval, test_seed, device, ctrl_fn=agent, ctrl_layer=mid, record=True)
    m["decisions_per_episode"] = float(agent.decisions(test["lengths"])[2].sum(1).mean())    # mask (n, N) summed
    return {"metrics": rl_report(args, name, m, test, data, log, t0), "policy": policy.state_dict()}

# Why codes help credit assignment (App. E.2), as a toy: a code z = mu + eps (eps ~ N(0, I_Z)) held for K primitive
# steps a_t ~ N(W z, I_d) (W: the frozen decoder and model, linearised), one terminal reward r = 1[v . mean_t a_t > 0].
# Two unbiased estimators of the gradient of E[r] with respect to mu:
#   raw actions (through the actions' likelihood):  g_raw = r sum_t grad_z log pi(a_t | z) = r W^T sum_t (a_t - W z)
#   internal RL (a bandit over z):                  g_z   = r grad_mu log N(z; mu, I)    = r eps
# g_raw sums K noisy d-dimensional terms: tr Var[g_raw] / tr Var[g_z] ~ K ||W||_F^2 / Z, about K d / Z.
def variance_toy(seed: int, Z: int = 8, Ks=(1, 2, 4, 8, 16, 32, 64), ds=(2, 8, 32), n: int = 20000) -> dict:
    """tr Var[g_raw] / tr Var[g_z] at mu = 0, n samples per (d, K): ``ratio`` and ``predicted`` (len(ds), len(Ks));
    ``mean_gap_se``: the largest difference of the two estimators' means in standard errors (both are unbiased)."""
    rng, ratio, gaps, predicted = np.random.default_rng(seed), [], [], []
    for d in ds:
        W = rng.normal(0, 1 / math.sqrt(Z), (d, Z))                                      # (d, Z) z -> mean action
        v = rng.normal(size=d)                                                            # (d,) the rewarded direction
        ratio.append([])
        predicted.append([K * float((W ** 2).sum()) / Z for K in Ks])
        for K in Ks:
            eps = rng.normal(size=(n, Z))                                                 # (n, Z) z = mu + eps, mu = 0
            noise = rng.normal(0, math.sqrt(K), (n, d))   # (n, d) sum_t (a_t - W z): K steps of N(0, I_d), summed
            r = ((eps @ W.T + noise / K) @ v > 0).astype(float)[:, None]                 # (n, 1) the terminal reward
            g_raw = r * (noise @ W)                                   # ALGO LOGIC: r W^T sum_t (a_t - W z)   (n, Z)
            g_z = r * eps                                             # ALGO LOGIC: r eps, the code-level estimator
            ratio[-1].append(float(g_raw.var(0).sum() / g_z.var(0).sum()))
            gaps.append(float((abs(g_raw.mean(0) - g_z.mean(0)) / np.sqrt((g_raw.var(0) + g_z.var(0)) / n)).max()))
    return {"Z": Z, "K": list(Ks), "d": list(ds), "ratio": ratio, "predicted": predicted, "mean_gap_se": max(gaps)}

# ---------------------------------------------------------------------------------------------------
# 12. Figures
FIGURES = ("env.png", "probe_accuracy.png", "controller_success.png", "beta_traces.png", "rl_curves.png",
           "variance_ratio.png", "rate_distortion.png")

def make_figures(args: Args, results: dict) -> list:
    """The run's PNGs: the env (Fig. 2), probes (Fig. 3/A1), controllers (Fig. 4), switching gate (Fig. 6/A3), RL
    curves (Fig. 8), App. E.2's variance ratio, rate against distortion (Fig. 7). A stage without results loses its own."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")                                       # files only, no screen
    paths, r, E = [], results, env_module(args.task)
    @contextlib.contextmanager
    def figure(name, title, size=(4.5, 3.2), rows=1, legend="best", **kw):   # with figure(...) as ax: draw; saved
        fig, ax = plt.subplots(rows, 1, figsize=size, squeeze=False, sharex=True)
        ax[0, 0].set_title(title, fontsize=8)
        ax[-1, 0].set(**kw)
        yield ax[:, 0]
        if legend:                                                  # legend: its loc, or None
            ax[0, 0].legend(frameon=False, fontsize=7, loc=legend)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name), dpi=100)
        plt.close(fig)
        paths.append(os.path.join(args.out, name))
    try:                                                            # one pretraining-task layout, as rgb_array
        env = (E.GridPinpadEnv if args.task == "grid" else E.AntPinpadEnv)(render_mode="rgb_array")
        env.reset(seed=args.seed, options={"task": E.PRETRAIN_TASKS[0]})
        img = env.render()                                          # (H, W, 3)
        with figure("env.png", "gridworld-pinpad (black: agent, grey: walls)" if args.task == "grid" else
                    "ant-pinpad (colours 0-3: red, orange, green, blue)", (3.2, 3.4), xticks=[], yticks=[], legend=None) as ax:
            ax[0].imshow(img)
    except Exception as e:  # noqa: BLE001 -- MuJoCo needs an OpenGL backend; the other figures do not
        if args.task == "grid":
            raise
        print(f"[12 figures] no env.png: MuJoCo cannot render here ({type(e).__name__}); try MUJOCO_GL=osmesa")
    if "probe_accuracy" in r:
        acc = r["probe_accuracy"]                                   # one per layer 0..L
        with figure("probe_accuracy.png", "Linear probe of the current subgoal", xlabel="layer l (0 = embedding)",
                    ylabel="held-out accuracy", xticks=range(len(acc)), ylim=(0, 1)) as ax:
            ax[0].plot(range(len(acc)), acc, "o-", color="C0", label="probe")
            ax[0].axhline(0.25, ls=":", color="grey", label="chance")
    if "controller_success" in r:
        L1 = len(r["controller_success"])                           # layers 0..L (None where not trained)
        with figure("controller_success.png", "Ground-truth subgoal controllers", xlabel="controlled layer l",
                    ylabel="success rate", xticks=range(L1), ylim=(0, 1.35), yticks=np.linspace(0, 1, 6), legend="upper left") as ax:
            for key, label, c in (("controller_success_pretrain", "pretraining tasks", "C0"),
                                  ("controller_success", "post-training task", "C3")):
                xs = [l for l in range(L1) if r[key][l] is not None]
                ax[0].plot(xs, [r[key][l] for l in xs], "o-", color=c, label=f"controllers, {label}")
            if r.get("controller_success_oracle") is not None:         # section 8's diagnostic (not the protocol)
                ax[0].plot([L1 // 2], [r["controller_success_oracle"]], "*", ms=10, color="C3",
                           label="trained with post-training episodes (diagnostic)")
            ax[0].axhline(r["base_success_pretrain"], ls="--", color="C0", alpha=0.6, label="base alone, pretraining")
            ax[0].axhline(r["base_success"], ls="--", color="C3", alpha=0.6, label="base alone, post-training")
    if "beta_examples" in r:                                        # beta_t over time, the true subgoals as bands
        ex = r["beta_examples"]                                     # six held-out episodes: beta_t and g_t
        with figure("beta_traces.png", f"Switching gate on held-out D* (bands: true subgoal; F1 "
                    f"{r['switch_f1']:.2f})", (5.5, 1.1 * len(ex) + 0.6), len(ex), xlabel="time step t", legend=None) as ax:
            for a, e in zip(ax, ex):
                for t, g in enumerate(e["subgoals"]):
                    a.axvspan(t - 0.5, t + 0.5, color=f"C{g}", alpha=0.25, lw=0)
                a.plot(range(len(e["beta"])), e["beta"], "k.-", lw=1, ms=3)
                a.axhline(0.5, ls=":", color="grey", lw=0.8)
                a.set(ylim=(-0.05, 1.05), yticks=[0, 1], ylabel="beta")
    methods = [(k, lab) for k, lab in (("internal_rl", "internal RL"), ("internal_rl_no_temporal", "internal RL, beta = 1"),
                                       ("token_rl", "token-level RL")) if k in r]
    if methods:
        with figure("rl_curves.png", "Post-training task, sparse reward", xlabel="training episodes",
                    ylabel="success (training batches)", ylim=(-0.02, 1.02)) as ax:
            for k, lab in methods:
                c = np.array(r[k]["curve"])                             # (batches, 2): episodes so far, batch success
                w = max(1, len(c) // 20)                                # a moving average over batches, for readability
                smooth = np.convolve(c[:, 1], np.ones(w), "same") / np.convolve(np.ones(len(c)), np.ones(w), "same")
                ax[0].plot(c[:, 0], smooth, label=f"{lab} (test {r[k]['success']:.2f})")
    if "variance_toy" in r:                                         # App. E.2's argument, measured (section 11)
        v = r["variance_toy"]
        with figure("variance_ratio.png", f"Gradient variance, raw actions / codes (dotted: K ||W||^2 / Z, Z = "
                    f"{v['Z']})", xlabel="primitive steps K per code", ylabel="tr Var[g_raw] / tr Var[g_z]",
                    xscale="log", yscale="log") as ax:
            for i, (d, row) in enumerate(zip(v["d"], v["ratio"])):
                ax[0].plot(v["K"], row, "o-", color=f"C{i}", label=f"action dimension d = {d}")
                ax[0].plot(v["K"], v["predicted"][i], ":", color=f"C{i}")
    if "sweep" in r:                                                # Fig. 7: rate against distortion (section 10)
        with figure("rate_distortion.png", "Rate against distortion over alpha (numbers: switches per episode; "
                    "ring: switch F1 >= 0.9)", (6, 3.8), xlabel="distortion: held-out action NLL per step",
                    ylabel="rate: KL per step") as ax:
            ax[0].set_yscale("symlog", linthresh=0.01)                  # alpha = 0 sends far more than the rest
            for p in (runs := r["sweep"]["runs"]):
                first = p is next(q for q in runs if q["condition"] == p["condition"])        # one legend entry each
                ax[0].scatter(p["nll"], p["kl"], c="C0" if p["condition"] == "frozen" else "C3", s=60 if p["aligned"] else 18,
                              marker="o" if p["condition"] == "frozen" else "s", label=p["condition"] if first else None,
                              edgecolors="k" if p["aligned"] else "none")
                ax[0].annotate(f"{p['switches']:.1f}", (p["nll"], p["kl"]), fontsize=5, xytext=(3, 2), textcoords="offset points")
    for stale in {os.path.join(args.out, f) for f in FIGURES} - set(paths):    # figures of stages without results
        if os.path.exists(stale):
            os.remove(stale)
    return paths

# ---------------------------------------------------------------------------------------------------
# 13. main(): the stages in order
def open_run_folder(args: Args) -> None:
    """Create --out, or stop with one line saying why it cannot be used; --fresh deletes its checkpoints."""
    try:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "metrics.jsonl"), "a").close()          # the log's file: can we write here?
    except OSError as e:
        die(f"--out {args.out}: cannot use it as the run folder ({e.strerror or e}); choose another --out")
    for path in [os.path.join(args.out, name + ".pt") for name in CHECKPOINTS if args.fresh]:
        if os.path.exists(path):
            os.remove(path)
            print(f"[13 main] --fresh: deleted {path}")

def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    open_run_folder(args)
    torch.manual_seed(args.seed)                 # seed once; each stage also seeds its own generators
    log = Logger(args.out)
    log("1 args", " ".join(f"{k}={v}" for k, v in dataclasses.asdict(args).items()))
    t_start, stage_time = time.time(), {}                   # seconds per stage (reused: the loading time)
    results = {"task": args.task, "seed": args.seed, "device": str(device), "args": dataclasses.asdict(args)}
    # Per checkpoint: "trained" or "reused" by this run, or "kept" (a later stage's, still valid), and its
    # checksum, which its children's fingerprints chain (the grid's data are no checkpoint: made from the seed).
    status, sums = {}, ({"data": ""} if args.task == "grid" else {})
    def record(name: str, ck: dict) -> None:     # a checkpoint's metrics into results.json (RL and pretrain nested)
        flat = name in ("probe", "controllers", "metacontroller")
        results.update({k: v for k, v in ck["metrics"].items() if k != "train_time_s"} if flat else {name: ck["metrics"]})
    def stage(name: str, train) -> dict:         # reuse or train one checkpoint; time it; record its metrics
        t = time.time()
        ck, status[name] = run_stage(args, name, sums[CHECKPOINTS[name][1]], log, train)
        sums[name], stage_time[name] = ck["checksum"], time.time() - t
        record(name, ck)
        return ck
    def finish(stopped: str = "") -> dict:
        """Add the results of later stages whose checkpoints still fit, make the figures, write results.json."""
        kept, dropped = [], []
        for name, (_, parent, _, _) in CHECKPOINTS.items():
            path = os.path.join(args.out, name + ".pt")
            if name not in status and os.path.exists(path):
                ck = load_ckpt(path, fingerprint(args, name, sums[parent])) if parent in sums else None
                (dropped if ck is None else kept).append(name)
                if ck is not None:
                    record(name, ck)
                    sums[name], status[name] = ck["checksum"], "kept"
        if kept or dropped:
            log("13 main", f"results.json keeps the stages not run now whose checkpoints still fit: "
                f"{', '.join(kept) or 'none'}; leaves out those that no longer fit: {', '.join(dropped) or 'none'}")
        if "internal_rl" in results:            # App. E.2's toy beside the RL results: seconds, no checkpoint
            vt = results["variance_toy"] = variance_toy(args.seed)
            log("11 variance toy", f"tr Var[g_raw] / tr Var[g_z] at K = {vt['K'][0]} / {vt['K'][-1]} steps per code: " +
                ", ".join(f"{row[0]:.1f} / {row[-1]:.0f} (d = {d})" for d, row in zip(vt["d"], vt["ratio"])))
        figs = [] if stopped else make_figures(args, results)   # (an interrupted run keeps the old figures)
        results.update(stage_status=status, stage_time_s=stage_time, wall_time_s=time.time() - t_start,
                       **({"stopped": stopped} if stopped else {}))
        atomic_write(os.path.join(args.out, "results.json"),
                     lambda f: f.write(json.dumps(finite(results), indent=1, allow_nan=False).encode()))
        if not stopped:
            log("13 main", f"done in {results['wall_time_s'] / 60:.1f} min ({'the sweep' if args.sweep else 'stage ' + args.stop_after}) | results.json "
                f"and figures in {args.out}: {', '.join(os.path.basename(f) for f in figs)}")
        return results

    try:
        if args.task == "ant":                   # fail early, with the fix, where MuJoCo cannot load
            try:
                env_module("ant").AntPinpadEnv().close()
            except Exception as e:  # noqa: BLE001
                die(f"--task ant needs MuJoCo ({type(e).__name__}: {str(e)[:120]}); pip install -r requirements.txt")
        t = time.time()
        data = make_datasets(args, log)
        if args.task == "ant":                   # the stored sets: a checkpoint that pretraining builds on
            sums["data"], status["data"] = data["checksum"], data["status"]
            results.update(expert_success_pretrain=data["expert"]["pretrain"], expert_success_posttrain=data["expert"]["posttrain"])
        stage_time["data"] = time.time() - t
        log("3 data", f"held-out D {len(data['heldout'])} episodes, D* {len(data['dstar_train'])} train + "
            f"{len(data['dstar_heldout'])} held-out ({stage_time['data']:.1f}s)")
        ck = stage("pretrain", lambda: pretrain(args, data, device, log))
        torch.manual_seed(args.seed)             # the same random stream from here on, trained or reused
        model = GPT(args).to(device)
        model.load_state_dict(ck["model"])       # (a checkpoint that matches its fingerprint has this code's shapes)
        model.requires_grad_(False).eval()       # frozen from here on
        if args.sweep:                           # Fig. 7's sweep instead of the later stages
            ck = stage("sweep", lambda: alpha_sweep(args, model, data, device, log))
            atomic_write(os.path.join(args.out, "sweep.json"),
                         lambda f: f.write(json.dumps(finite(ck["metrics"]), indent=1, allow_nan=False).encode()))
            return finish()
        todo = STAGES[1:STAGES.index(args.stop_after) + 1]                  # the stages after pretraining, in order
        if "probe" in todo:
            stage("probe", lambda: probe_stage(args, model, data, device, log))
        if "controllers" in todo:
            stage("controllers", lambda: controller_stage(args, model, data, device, log))
        if "metacontroller" in todo:
            ck = stage("metacontroller", lambda: metacontroller_stage(args, model, data, device, log))
            mcs = {k: MetaController(args).to(device) for k in ("mc", "mc_forced")}
            for k, mc in mcs.items():
                mc.load_state_dict(ck[k])
        if "rl" not in todo:
            return finish()
        stage("token_rl", lambda: token_rl(args, model, data, device, log))
        stage("internal_rl", lambda: internal_rl(args, model, mcs["mc"], data, device, log, forced=False))
        stage("internal_rl_no_temporal", lambda: internal_rl(args, model, mcs["mc_forced"], data, device, log, forced=True))
        mid = args.n_layer // 2
        log("13 main", f"probe gap {results['probe_gap_mid']:+.3f} | controllers at layer {mid}: pretraining tasks "
            f"{results['controller_success_pretrain'][mid]} / post-training {results['controller_success'][mid]} | "
            f"switch F1 {results['switch_f1']:.3f} | post-training success: token-level RL "
            f"{results['token_rl']['success']:.3f}, internal RL {results['internal_rl']['success']:.3f}, without "
            f"temporal abstraction {results['internal_rl_no_temporal']['success']:.3f}")
        return finish()
    except (KeyboardInterrupt, Diverged) as e:   # one line, no traceback; results.json stays valid
        finished = [name for name, s in status.items() if s != "kept"]      # trained or reused by this run
        msg, code = (str(e), 1) if isinstance(e, Diverged) else (
            f"interrupted; finished stages: {', '.join(finished) or 'none'} (checkpoints in {args.out}); rerun the "
            f"same command to continue from there", 130)
        finish(stopped=msg)
        print(f"internal_rl.py: {msg}", file=sys.stderr)
        sys.exit(code)                           # 1: diverged; 130: interrupted, as a shell reports Ctrl-C

if __name__ == "__main__":
    main()
