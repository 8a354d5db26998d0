"""Tests: env contracts, model invariants, numerical references, and small runs that must learn.

Run with ``python -m pytest -q test_internal_rl.py`` (about a minute on an idle 2-core CPU)."""
import copy
import dataclasses
import functools
import glob
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import gymnasium as gym
from gymnasium.utils.env_checker import check_env

import gridworld as gw
import internal_rl as ir


HERE = os.path.dirname(os.path.abspath(__file__))
# The tests' settings: the quick preset (every stage, as a user runs it), made smaller still.
SMALLER = dict(n_embd=32, n_layer=2, n_head=2, batch_size=32, bucket_batches=2, n_heldout=64, n_dstar=64, probe_steps=30,
               ctrl_steps=10, ctrl_batch=16, ctrl_layers="all", ctrl_oracle=True, n_eval=16, log_every=1000,
               eval_every=1000, warmup=10, mc_steps=4, mc_batch=16, n_probe=64, rl_episodes=32,
               rl_batch=16, rl_eval=16, sweep_steps=3, cotrain_steps=3)
TINY = ["--preset", "quick"] + [x for k, v in SMALLER.items() for x in (
    ["--" + k.replace("_", "-")] if v is True else ["--" + k.replace("_", "-"), str(v)])]


def tiny_args(**kw) -> ir.Args:
    return ir.Args(**{**ir.PRESETS["grid"]["quick"], **SMALLER, **kw})


# ------------------------------------------------------------------------------------------- the env
def test_check_env_passes():
    check_env(gw.GridPinpadEnv(), skip_render_check=True)
    env = gym.make("GridPinpad-v0", render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (7 * 24, 7 * 24, 3) and img.dtype == np.uint8
    env = gym.make("GridPinpad-v0", render_mode="ansi")
    env.reset(seed=0)
    assert "task" in env.render()


def expected_obs(env) -> np.ndarray:
    """The observation written out channel by channel from the spec: walls, colours, agent; nothing else."""
    ref = np.zeros((49, 13), dtype=np.float32)
    for w, cell in enumerate(env.wall_cells):
        ref[cell, w] = 1
    for c, cell in enumerate(env.colour_cells):
        ref[cell, 4 + c] = 1
    ref[env.agent, 12] = 1
    return ref.reshape(-1)


def test_observation_is_walls_colours_agent_only():
    env, rng = gw.GridPinpadEnv(), np.random.default_rng(0)
    obs, info = env.reset(seed=3, options={"task": gw.PRETRAIN_TASKS[0]})
    assert obs.shape == (637,) and obs.dtype == np.float32 and obs.sum() == 13   # one 1 per channel
    assert np.array_equal(obs, expected_obs(env))
    # visiting colours (progress) never shows: every observation of an expert episode is walls, colours, agent
    for _ in range(60):
        obs, r, term, trunc, info = env.step(env.expert_action(rng))
        assert np.array_equal(obs, expected_obs(env))
        if term:
            break
    assert info["visited"] == 6 and info["success"]


def test_observation_carries_no_task():
    """Same seed, different tasks: whenever the layout comes out the same, so must every observation."""
    a, b, same = gw.GridPinpadEnv(), gw.GridPinpadEnv(), 0
    for seed in range(20):
        oa, _ = a.reset(seed=seed, options={"task": gw.PRETRAIN_TASKS[0]})
        ob, _ = b.reset(seed=seed, options={"task": gw.PRETRAIN_TASKS[9]})
        if a.cells() == b.cells():
            same += 1
            for action in (0, 2, 1, 3, 0):
                assert np.array_equal(oa, ob)
                if a.ended or b.ended:
                    break
                oa, ob = a.step(action)[0], b.step(action)[0]
    assert same >= 10


def test_observation_changes_when_agent_moves():
    env = gw.GridPinpadEnv()
    obs, _ = env.reset(seed=1)
    moved = 0
    for a in range(4):
        before = env.agent
        o2, *_ = env.step(a)
        if env.agent != before:
            moved += 1
            assert not np.array_equal(obs, o2)
            assert o2.reshape(49, 13)[env.agent, gw.AGENT_CHANNEL] == 1
        obs = o2
        if env.ended:
            break
    assert moved >= 1


@pytest.mark.parametrize("task", ["012", (1.7, 2.2), (True, False), (), (0, 8), (-1, 2), (3, 3, 1), 5])
def test_grid_tasks_are_validated_not_coerced(task):
    with pytest.raises(ValueError, match="non-empty sequence of ints 0..7"):
        gw.GridPinpadEnv().reset(seed=0, options={"task": task})
    with pytest.raises(ValueError, match="non-empty sequence of ints 0..7"):
        gw.GridPinpadEnv(task=task)


def test_grid_accepts_numpy_ints_and_checks_actions_and_episode_state():
    env = gw.GridPinpadEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)                                   # before any reset
    env.reset(seed=0, options={"task": np.array([0, 1, 4, 5])})
    assert env.task == (0, 1, 4, 5) and all(type(c) is int for c in env.task)
    for bad in (-1, 4, 5, 1.0, True, "0", None):
        with pytest.raises(ValueError, match="an action is an int in 0..3"):
            env.step(bad)
    env.step(np.int64(0))
    short = gw.GridPinpadEnv(max_steps=2)
    short.reset(seed=0)
    short.agent, a = next((c, a) for c in range(49) for a in range(4) if short.kind[c] == -1 and gw.NEXT[c][a] == c)
    short.step(a)
    assert short.step(a)[3]                           # truncated at step 2
    with pytest.raises(RuntimeError, match="episode has ended"):
        short.step(a)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_steps must be a positive int"):
            gw.GridPinpadEnv(max_steps=bad)


def test_grid_action_check_survives_python_O():
    """The action check is an explicit if, not an assert that python -O removes."""
    code = ("import gridworld as gw\nenv = gw.GridPinpadEnv()\nenv.reset(seed=0)\n"
            "for a in (-1, 5):\n    try:\n        env.step(a)\n    except ValueError:\n        print('refused', a)\n")
    p = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, cwd=HERE, timeout=60)
    assert p.stdout.split("\n")[:2] == ["refused -1", "refused 5"], p.stderr


def test_table_a1_has_none_of_the_post_training_subgoal_transitions():
    """Table A1: 16 tasks of three colour pairs; the post-training task A-B-C-D-A-B uses only subgoal
    transitions that no pretraining task has."""
    subgoals = lambda task: [gw.subgoal_of(c) for c in task[::2]]
    pairs = lambda task: set(zip(subgoals(task), subgoals(task)[1:]))
    assert len(set(gw.PRETRAIN_TASKS)) == 16
    for task in gw.PRETRAIN_TASKS:
        assert len(task) == 6 and all(task[i + 1] == task[i] + 1 and task[i] % 2 == 0 for i in (0, 2, 4))
    seen = set().union(*map(pairs, gw.PRETRAIN_TASKS))
    assert pairs(gw.POSTTRAIN_TASK) == {(0, 1), (1, 2), (2, 3), (3, 0)} and seen.isdisjoint(pairs(gw.POSTTRAIN_TASK))


@pytest.mark.parametrize("task", list(gw.PRETRAIN_TASKS) + [gw.POSTTRAIN_TASK])
def test_expert_completes_every_task_in_the_env(task):
    env, rng = gw.GridPinpadEnv(), np.random.default_rng(0)
    wins = 0
    for ep in range(20):
        env.reset(seed=ep, options={"task": task})
        while True:
            _, r, term, trunc, info = env.step(env.expert_action(rng))
            if term or trunc:
                break
        assert not env.failed, "the expert must never step on a wrong colour"
        wins += info["success"] and r == 1.0
    assert wins >= 19          # the only allowed failure is a time-out (possible on the 12-colour task)


@pytest.mark.parametrize("epsilon", [0.0, 0.3])          # 0.3: random safe moves, wall bumps among them
def test_reference_expert_episode_follows_env_dynamics(epsilon):
    bumps = 0
    for seed in range(5):
        ep = gw.expert_episode(np.random.default_rng(seed), gw.PRETRAIN_TASKS[seed], epsilon)
        env = gw.GridPinpadEnv()
        env.reset(seed=seed, options={"task": gw.PRETRAIN_TASKS[seed]})    # same seed -> same layout
        assert env.cells() == ep["cells"][0].tolist()
        for t, a in enumerate(ep["actions"]):
            assert ep["subgoals"][t] == env.subgoal and (epsilon > 0 or ep["optimal"][t, a])
            _, r, term, trunc, info = env.step(int(a))
            assert env.cells() == ep["cells"][t + 1].tolist()
            bumps += int(ep["cells"][t + 1][-1] == ep["cells"][t][-1])
        assert term and info["success"] and ep["success"]
    assert (bumps > 0) == (epsilon > 0)                   # the no-op branch was replayed too


def next_to(env, colour: int) -> int:
    """Put the agent on an empty cell beside ``colour``'s cell; returns the action that steps onto it."""
    cell = env.colour_cells[colour]
    env.agent = next(c for c in range(49) if env.kind[c] == -1 and cell in gw.NEXT[c].tolist())
    return gw.NEXT[env.agent].tolist().index(cell)


@pytest.mark.parametrize("wrong", [3, 4])            # task 0 is 0-1-4-5-0-1: 3 is not in it, 4 comes later
def test_wrong_colour_terminates_with_zero_reward(wrong):
    env = gw.GridPinpadEnv()
    env.reset(seed=0, options={"task": gw.PRETRAIN_TASKS[0]})
    _, r, term, trunc, info = env.step(next_to(env, wrong))
    assert term and not trunc and r == 0.0 and not info["success"] and env.failed


def test_stepping_back_onto_the_colour_just_visited_fails():
    env = gw.GridPinpadEnv()
    env.reset(seed=0, options={"task": gw.PRETRAIN_TASKS[0]})   # after colour 0 the task needs 1
    on = next_to(env, 0)
    assert not env.step(on)[2] and env.progress == 1
    assert not env.step(on ^ 1)[2]                                  # back off it (0/1 up/down, 2/3 left/right)
    _, r, term, _, _ = env.step(on)
    assert term and r == 0.0 and env.failed


def test_truncation_at_100_steps():
    env = gw.GridPinpadEnv()
    env.reset(seed=0)
    # put the agent on an empty edge cell and bump into the grid's edge forever (never reaches a colour)
    env.agent, a = next((c, a) for c in range(49) for a in range(4) if env.kind[c] == -1 and gw.NEXT[c][a] == c)
    for t in range(100):
        _, r, term, trunc, _ = env.step(a)
        assert trunc == (t == 99) and not term and r == 0.0


def test_expert_noise_stays_safe():
    rng = np.random.default_rng(0)
    eps = [gw.expert_episode(rng, gw.PRETRAIN_TASKS[i % 16], epsilon=0.2) for i in range(100)]
    assert all(ep["success"] for ep in eps)
    clean = [gw.expert_episode(rng, gw.PRETRAIN_TASKS[i % 16]) for i in range(100)]
    assert np.mean([len(e["actions"]) for e in eps]) > np.mean([len(e["actions"]) for e in clean])


def task_of(ep) -> tuple:
    """The task of a successful expert episode: its colours in the order it visits them."""
    return tuple(int(c) for c, _ in itertools.groupby(ep["next_colour"]))


@pytest.mark.parametrize("epsilon", [0.0, 0.2])
def test_vectorised_expert_replays_in_the_env_with_only_optimal_actions(epsilon):
    """expert_episodes (numpy, all episodes in lock-step): replayed step by step in GridPinpadEnv on the same
    layout, every episode reaches the same observations and succeeds, and (epsilon = 0) every action is optimal by
    the reference dynamic programme, whose optimal set is the episode's ``optimal`` mask at every step."""
    rng = np.random.default_rng(1)
    eps = gw.expert_episodes(rng, 150, gw.PRETRAIN_TASKS, epsilon) + gw.expert_episodes(rng, 30, [gw.POSTTRAIN_TASK], epsilon)
    assert all(ep["success"] for ep in eps[:150])                           # (the 12-colour task may time out)
    for ep in (ep for ep in eps if ep["success"]):
        env = gw.GridPinpadEnv()
        env.reset(seed=0, options={"task": task_of(ep), "layout": ep["cells"][0]})
        assert env.cells() == ep["cells"][0].tolist()
        for t, a in enumerate(ep["actions"]):
            target = env.task[env.progress]
            best = gw.optimal_actions(env.agent, env.kind, env.dists[target], target)
            assert ep["next_colour"][t] == target and ep["subgoals"][t] == env.subgoal
            assert np.flatnonzero(ep["optimal"][t]).tolist() == best and (epsilon > 0 or a in best)
            _, r, term, trunc, info = env.step(int(a))
            assert env.cells() == ep["cells"][t + 1].tolist()
        assert term and info["success"] and r == 1.0


def test_vectorised_expert_breaks_ties_uniformly_and_matches_the_reference_law():
    """Among two optimal actions each is taken half the time (a binomial test over every such step), and
    episode lengths (which the layout law and the shortest paths set) agree with the reference expert's."""
    rng = np.random.default_rng(2)
    fast = gw.expert_episodes(rng, 1500, gw.PRETRAIN_TASKS)
    first = [int(a == np.flatnonzero(opt)[0]) for ep in fast for a, opt in zip(ep["actions"], ep["optimal"])
             if opt.sum() == 2]
    assert len(first) > 5000 and abs(np.mean(first) - 0.5) < 4.5 * math.sqrt(0.25 / len(first))
    ref = [gw.expert_episode(rng, gw.PRETRAIN_TASKS[i % 16]) for i in range(1500)]
    lf, lr = (np.array([len(ep["actions"]) for ep in eps]) for eps in (fast, ref))
    assert abs(lf.mean() - lr.mean()) < 4.5 * math.sqrt((lf.var() + lr.var()) / 1500)
    assert abs(lf.std() - lr.std()) < 0.1 * lr.std()


def test_expert_pool_gives_the_same_stream_whatever_the_workers():
    """ExpertPool's call i is the random stream (seed, i): 1 process and 2 worker processes hand out the same
    episodes, in the same order, and each call's episodes are new; with ``prepare`` (internal_rl's bucketing) the
    workers return its result on those episodes, with the stream's rng continued."""
    def calls(workers, prepare=None):
        pool = gw.ExpertPool(7, 12, gw.PRETRAIN_TASKS, 0.1, workers=workers, prepare=prepare)
        return pool, [pool() for _ in range(3)]
    (_, one), (pool, two) = calls(1), calls(2)
    key = lambda eps: [(ep["cells"].tolist(), ep["actions"].tolist()) for ep in eps]
    assert [key(c) for c in one] == [key(c) for c in two]
    assert key(one[0]) != key(one[1]) and all(len(c) == 12 and all(ep["success"] for ep in c) for c in one)
    rng = np.random.default_rng([7, 0])
    assert key(one[0]) == key(gw.expert_episodes(rng, 12, gw.PRETRAIN_TASKS, 0.1))
    want = ir.buckets(one[0], rng, 3)                # call 0's episodes, bucketed with its rng continued
    for workers in (1, 2):
        got = calls(workers, functools.partial(ir.buckets, size=3))[1][0]
        assert [len(b["mask"]) for b in got] == [len(b["mask"]) for b in want] and len(want) == 4
        assert all(b.keys() == w.keys() and all(np.array_equal(b[k], w[k]) for k in b) for b, w in zip(got, want))
    pids = sorted(w.pid for w in pool.pool._pool)
    for pid in pids:                                 # Ctrl-C reaches the workers too: they leave it to the run
        os.kill(pid, signal.SIGINT)
    time.sleep(1.0)                                  # (a worker that died of it would have been replaced by now)
    assert sorted(w.pid for w in pool.pool._pool if w.is_alive()) == pids and len(pool()) == 12


def test_bitmask_distance_maps_equal_the_reference_search():
    """_distance_maps (all layouts and colours at once) is distances_to, map by map, unreachable cells included."""
    rng = np.random.default_rng(3)
    kind = np.full((200, 49), -1)
    cells = np.argsort(rng.random((200, 49)), axis=1)[:, :12]                 # 4 walls, 8 colours
    for i in range(200):
        kind[i, cells[i, :4]], kind[i, cells[i, 4:]] = np.arange(8, 12), np.arange(8)
    dist = gw._distance_maps(kind, cells[:, 4:])
    for i in range(200):
        for c in range(8):
            assert dist[i, c].tolist() == gw.distances_to(int(cells[i, 4 + c]), kind[i].tolist())


def test_a_given_layout_is_validated():
    env = gw.GridPinpadEnv()
    for cells in ([0] * 13, list(range(12)), list(range(14)), list(range(12)) + [49], list(range(1, 13)) + [-1]):
        with pytest.raises(ValueError, match="13 distinct cells"):       # repeated, too few, too many, off the grid
            env.reset(options={"layout": cells})


# ----------------------------------------------------------------------------------- the ant env
# MuJoCo may be missing or unable to load on some machines: these tests then skip, with the reason.
import ant_tasks as at  # noqa: E402  (imports MuJoCo lazily, so this never fails)


@pytest.fixture(scope="module")
def ant_env():
    pytest.importorskip("mujoco")          # a pinned requirement: any other failure to build the env is a failure
    return at.AntPinpadEnv()


def teleport(env, cell, z=None):
    """Put the ant's centre at a cell's centre (and optionally its torso at height z), at rest."""
    qpos, qvel = env.ant.data.qpos.copy(), np.zeros(env.ant.model.nv)
    qpos[:2] = at.cell_centre(cell) if cell >= 0 else (at.HALF + 0.5, 0.0)
    if z is not None:
        qpos[2] = z
    env.ant.set_state(qpos, qvel)


def test_ant_check_env_passes(ant_env):
    check_env(at.AntPinpadEnv(), skip_render_check=True)
    env = gym.make("AntPinpad-v0")
    obs, info = env.reset(seed=0)
    assert obs.shape == (at.OBS_DIM,) and obs.dtype == np.float32 and info["subgoal"] in range(4)


def test_ant_renders_a_top_view(ant_env):
    import mujoco
    try:                                   # only a missing OpenGL skips; the env's own rendering must work
        mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8).close()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no OpenGL for MuJoCo here ({type(e).__name__}); try MUJOCO_GL=osmesa")
    env = at.AntPinpadEnv(render_mode="rgb_array", width=64, height=64)
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5


def test_ant_tasks_pretraining_never_has_the_post_training_transitions():
    pairs = lambda task: {(a, b) for a, b in zip(task, task[1:])}
    seen = set().union(*map(pairs, at.PRETRAIN_TASKS))
    assert len(at.PRETRAIN_TASKS) == 16 and all(len(t) == 3 for t in at.PRETRAIN_TASKS)
    assert seen.isdisjoint(pairs(at.POSTTRAIN_TASK)) and len(seen) == 8


def test_ant_visits_and_every_episode_end(ant_env):
    env, zero = ant_env, np.zeros(8, dtype=np.float32)
    env.reset(seed=1, options={"task": (2, 0, 3)})
    free = next(c for c in range(at.N_CELLS) if c not in env.colour_cells and c != env.wall)
    teleport(env, env.colour_cells[2])                       # the first needed colour: a visit, no reward
    _, r, term, _, info = env.step(zero)
    assert (r, term, info["visited"], info["subgoal"]) == (0.0, False, 1, 0)
    for _ in range(3):                                       # staying inside it is not a new visit
        _, r, term, _, info = env.step(zero)
        assert (r, term, info["visited"]) == (0.0, False, 1)
    teleport(env, free)
    env.step(zero)
    teleport(env, env.colour_cells[2])                       # back onto the colour just visited: failure
    _, r, term, _, info = env.step(zero)
    assert term and r == 0.0 and info["end"] == "wrong colour" and not info["success"]
    for cell, z, end in ((env.wall, None, "wall"), (-1, None, "outside"), (free, 1.3, "height")):
        env.reset(seed=1, options={"task": (2, 0, 3)})
        teleport(env, free if cell == env.wall else cell, z)
        if cell == env.wall:                                 # walk in from a free cell
            env.step(zero)
            teleport(env, env.wall)
        _, r, term, _, info = env.step(zero)
        assert term and r == 0.0 and info["end"] == end, (end, info)
    env.reset(seed=1, options={"task": (2, 0, 3)})
    for i, colour in enumerate((2, 0, 3)):                   # the whole task, in order: reward 1 at the end
        teleport(env, free)
        env.step(zero)
        teleport(env, env.colour_cells[colour])
        _, r, term, _, info = env.step(zero)
        assert (r, term) == ((1.0, True) if i == 2 else (0.0, False))
    assert info["success"] and info["end"] == "success"
    short = at.AntPinpadEnv(max_steps=3)                     # time-out: truncation, not termination
    short.reset(seed=1, options={"task": (2, 0, 3)})
    for t in range(3):
        teleport(short, free)
        _, r, term, trunc, info = short.step(zero)
        assert (term, trunc) == (False, t == 2) and r == 0.0
    assert info["end"] == "time-out" and not short.failed


def test_ant_observation_carries_no_task(ant_env):
    """Same seed, different tasks: whenever the layout comes out the same, so must every observation."""
    a, b, same = at.AntPinpadEnv(), at.AntPinpadEnv(), 0
    for seed in range(10):
        oa, _ = a.reset(seed=seed, options={"task": (0, 2, 1)})
        ob, _ = b.reset(seed=seed, options={"task": (3, 1, 0)})
        if (a.colour_cells, a.wall) == (b.colour_cells, b.wall):
            same += 1
            for _ in range(5):
                assert np.array_equal(oa, ob)
                oa, ob = a.step(np.full(8, 0.3))[0], b.step(np.full(8, 0.3))[0]
    assert same >= 5
    o = a._obs()
    a.progress, a.task = 2, (3, 1, 0)                     # planted progress and task: the observation is the same
    assert np.array_equal(a._obs(), o)


def test_ant_expert_walks_the_tasks(ant_env):
    rng = np.random.default_rng(0)
    eps = [at.expert_episode(ant_env, rng, at.PRETRAIN_TASKS[i], noise=0.0) for i in range(0, 16, 2)]
    assert sum(ep["success"] for ep in eps) >= 6                 # measured: ~0.85 of episodes succeed
    ep = eps[0]
    assert ep["obs"].shape == (len(ep["actions"]) + 1, at.OBS_DIM) and ep["actions"].shape[1] == 8
    assert np.abs(ep["actions"]).max() <= 1.0 and set(ep["subgoals"]) <= set(at.PRETRAIN_TASKS[0])


def test_ant_validates_tasks_actions_and_episode_state(ant_env):
    env = at.AntPinpadEnv(max_steps=1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(8))                                            # before any reset
    for task in ("012", (1.7, 2.2), (True, False), (), (0, 4), (2, 2, 1)):
        with pytest.raises(ValueError, match="non-empty sequence of ints 0..3"):
            env.reset(seed=0, options={"task": task})
    env.reset(seed=0, options={"task": np.array([0, 2, 1])})
    for bad in (np.full(8, np.nan), np.array([np.inf] + [0.0] * 7), np.zeros(7), "x", None):
        with pytest.raises(ValueError, match="8 finite torques"):
            env.step(bad)
    assert env.step(np.full(8, 5.0))[3]                                  # clipped, and truncated at max_steps 1
    with pytest.raises(RuntimeError, match="episode has ended"):
        env.step(np.zeros(8))
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        at.AntPinpadEnv(max_steps=0)


@pytest.mark.parametrize("argv, needle", [
    (["--picture", "x.txt"], "--picture must name a .png file"),
    (["--picture", os.path.join(HERE, "README.md", "x.png")], "cannot write into"),
    (["--episodes", "-3"], "--episodes must be non-negative"),
    (["--noise", "nan"], "--noise must be a finite"),
])
def test_ant_tasks_command_line_errors_are_one_line(argv, needle):
    p = subprocess.run([sys.executable, os.path.join(HERE, "ant_tasks.py")] + argv, capture_output=True, text=True,
                       cwd=HERE, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("ant_tasks.py: error: ") and needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""


# ------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def model_and_batch():
    args = tiny_args(obj_attn="2")          # block 2 (above L/2 = 1) with object attention, so every test covers it
    torch.manual_seed(0)
    model = ir.GPT(args)
    # non-zero relative biases, so the tests also cover them
    for b in model.blocks:
        torch.nn.init.normal_(b.attn.rel_bias.weight, std=0.5)
    eps = ir.generate_episodes(np.random.default_rng(0), 6, gw.PRETRAIN_TASKS, 0.0)
    return args, model.eval(), ir.collate(eps, "cpu")


def test_object_attention_presets():
    """The grid preset puts object attention in the top block, whatever the depth; the ant has none."""
    assert ir.obj_attn_blocks(ir.parse_args(["--task", "grid"])) == [4]
    assert ir.obj_attn_blocks(ir.parse_args(["--task", "grid", "--n-layer", "6"])) == [6]
    assert ir.obj_attn_blocks(ir.parse_args(["--task", "ant"])) == []
    model = ir.GPT(tiny_args(obj_attn="last"))
    assert [b.obj_attn is not None for b in model.blocks] == [False, True]


def test_transformer_is_causal(model_and_batch):
    args, model, b = model_and_batch
    cells = b["obs"].clone()
    a1, o1, r1 = model(cells)
    t = 5
    cells[:, t + 1:, -1] = (cells[:, t + 1:, -1] + 7) % 49                  # change every step after t
    a2, o2, r2 = model(cells)
    assert torch.equal(a1[:, :t + 1], a2[:, :t + 1]) and torch.equal(o1[:, :t + 1], o2[:, :t + 1])
    assert not torch.allclose(a1[:, t + 1:], a2[:, t + 1:])
    for l in range(args.n_layer + 1):
        assert torch.equal(r1[l][:, :t + 1], r2[l][:, :t + 1])


def test_kv_cache_matches_full_forward(model_and_batch):
    _, model, b = model_and_batch
    full, _, _ = model(b["obs"])
    cache, steps = [{} for _ in model.blocks], []
    for t in range(b["obs"].shape[1]):
        logits, _, _ = model(b["obs"][:, t:t + 1], cache=cache)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_controlled_forward_matches_a_hand_written_reference(model_and_batch):
    """Eq. 1 by hand: run the blocks one by one and add U e after block l, with U an explicit matrix."""
    args, model, b = model_and_batch
    torch.manual_seed(1)
    U = torch.randn(args.n_embd, args.n_embd) * 0.1
    layer = 1
    out, _, _ = model(b["obs"], lambda x: x @ U.T, layer)
    e, objs = model.embed(b["obs"])
    for l, block in enumerate(model.blocks, start=1):
        e = block(e, model.buckets, None, objs)
        if l == layer:
            e = e + torch.einsum("ij,btj->bti", U, e)                          # e <- e + U e
    ref = model.action_head(model.ln_f(e))
    assert torch.allclose(out, ref, atol=1e-5)
    # and with the KV cache, step by step, as in rollouts
    ctrl = ir.SubgoalControllers(4, args.n_embd, args.ctrl_rank)
    with torch.no_grad():
        ctrl.A.normal_(std=0.1)
    g = b["subgoals"].clamp(min=0)
    full, _, _ = model(b["obs"], lambda x: ctrl(x, g), layer)
    cache, steps = [{} for _ in model.blocks], []
    for t in range(b["obs"].shape[1]):
        gt = g[:, t:t + 1]
        steps.append(model(b["obs"][:, t:t + 1], lambda x: ctrl(x, gt), layer, cache)[0])
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_zero_controller_is_exact_identity_and_nonzero_steers(model_and_batch):
    args, model, b = model_and_batch
    ctrl = ir.SubgoalControllers(gw.N_SUBGOALS, args.n_embd, args.ctrl_rank)   # A = 0 at init
    g = b["subgoals"].clamp(min=0)
    base, _, _ = model(b["obs"])
    for layer in range(args.n_layer + 1):
        same, _, _ = model(b["obs"], lambda x: ctrl(x, g), layer)
        assert torch.equal(same, base)
    with torch.no_grad():
        ctrl.A.normal_()
    moved, _, _ = model(b["obs"], lambda x: ctrl(x, g), 1)
    assert not torch.allclose(moved, base, atol=1e-3)


def test_controller_is_low_rank_and_matches_explicit_matrix():
    D, r = 32, 16
    ctrl = ir.SubgoalControllers(4, D, r)
    with torch.no_grad():
        ctrl.A.normal_()
    x, g = torch.randn(3, 7, D), torch.randint(0, 4, (3, 7))
    out = ctrl(x, g)
    for k in range(4):
        U = ctrl.A[k] @ ctrl.B[k].T                                            # (D, D)
        U_applied = ctrl(torch.eye(D)[None], torch.full((1, D), k))[0].T     # the map forward applies: U e_i
        assert torch.allclose(U_applied, U, atol=1e-5) and torch.linalg.matrix_rank(U_applied) <= r
        ref = x @ U.T                                                          # U e for every step
        assert torch.allclose(out[g == k], ref[g == k], atol=1e-5)


def test_buckets_cut_the_length_sorted_episodes_into_batches_in_random_order():
    """buckets: each batch is a run of the length-sorted episodes (so it pads only to its own longest), every
    episode is in one batch, and the batches come in the order of the rng's permutation."""
    eps = gw.expert_episodes(np.random.default_rng(5), 50, gw.PRETRAIN_TASKS)
    out = ir.buckets(eps, np.random.default_rng(1), 8)
    lengths = sorted(len(ep["actions"]) for ep in eps)
    runs, order = [lengths[i:i + 8] for i in range(0, 50, 8)], np.random.default_rng(1).permutation(7).tolist()
    assert order != sorted(order) and [sorted(b["mask"].sum(1).tolist()) for b in out] == [runs[j] for j in order]
    assert [b["mask"].shape[1] for b in out] == [max(runs[j]) for j in order]
    rows = [tuple(a[:n]) for b in out for a, n in zip(b["actions"].tolist(), b["mask"].sum(1).tolist())]
    assert sorted(rows) == sorted(tuple(ep["actions"].tolist()) for ep in eps)


def test_collate_puts_each_episode_in_its_row_and_pads_the_rest():
    """Row i of every field is episode i's steps, then the padding value; mask marks exactly the real steps."""
    eps = ir.generate_episodes(np.random.default_rng(4), 7, gw.PRETRAIN_TASKS, 0.1)
    b, T = ir.collate(eps, "cpu"), max(len(ep["actions"]) for ep in eps)
    fill = {"obs": 0, "actions": -1, "next_obs": -1, "subgoals": -1, "next_colour": -1, "optimal": False}
    for i, ep in enumerate(eps):
        n = len(ep["actions"])
        want = {"obs": ep["cells"][:-1], "actions": ep["actions"], "next_obs": ep["cells"][1:, -1],
                "subgoals": ep["subgoals"], "next_colour": ep["next_colour"], "optimal": ep["optimal"]}
        for k, v in want.items():
            assert b[k].shape[:2] == (7, T) and np.array_equal(b[k][i, :n].numpy(), v), k
            assert (b[k][i, n:] == fill[k]).all(), k
        assert b["mask"][i].tolist() == [True] * n + [False] * (T - n)


def test_relative_buckets_are_monotone_and_bounded():
    b = ir.relative_buckets(101, 32)
    d = b[100]                                       # distances 100..0 from the last query
    assert b.max() <= 31 and b[:, 0].tolist()[:16] == list(range(16))       # exact buckets for d < 16
    assert ir.relative_buckets(600, 32).max() == 31                         # distances past 128 share the last
    assert all(d[i] >= d[i + 1] for i in range(100))


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny base model pretrained for 150 steps, its data and its held-out NLL before training."""
    args = tiny_args(pretrain_steps=150, out=str(tmp_path_factory.mktemp("pre") / "a"), lr=2e-2, n_dstar=512,
                     n_probe=128, obj_attn="last")
    data = ir.make_datasets(args)
    torch.manual_seed(args.seed)
    before = ir.action_metrics(ir.GPT(args), data["heldout"], "cpu")["nll"]
    ck = ir.pretrain(args, data, "cpu", ir.Logger(args.out))
    model = ir.GPT(args)
    model.load_state_dict(ck["model"])
    return args, model.requires_grad_(False).eval(), data, ck["metrics"], before


def test_tiny_pretraining_lowers_heldout_nll(pretrained):
    args, _, data, m, before = pretrained
    assert m["heldout_nll"] < before - 0.1 and m["steps"] == 150


@torch.no_grad()
def controlled_nll(model, ctrl, layer, episodes):
    """Mean -ln p(a_t | o_{1:t}, g_t) with the controllers ``ctrl`` at ``layer`` (None: the base model alone)."""
    total, n = 0.0, 0
    for b in ir.batches_of(episodes, 256, "cpu"):
        g = b["subgoals"].clamp(min=0)
        act_out, _, _ = model(b["obs"], None if ctrl is None else (lambda x: ctrl(x, g)), layer)
        total -= model.action_logp(act_out, b["actions"])[b["mask"]].sum().item()
        n += int(b["mask"].sum())
    return total / n


def test_controllers_and_the_metacontroller_beat_the_base_models_heldout_nll(pretrained):
    """On a tiny budget, both ways of editing the residual stream must predict held-out D* actions better than
    the frozen model alone: the controllers are told the true subgoal (at layer 0, where this barely trained
    model takes their edit best), the metacontroller sees the whole episode (at L/2)."""
    args, model, data, _, _ = pretrained
    a = ir.Args(**{**args.__dict__, "ctrl_steps": 200, "ctrl_batch": 32, "ctrl_lr": 1e-2, "mc_steps": 50,
                   "mc_batch": 32, "mc_lr": 1e-2})
    log, held = ir.Logger(args.out), data["dstar_heldout"][:128]
    base = controlled_nll(model, None, -1, held)
    torch.manual_seed(0)
    ctrl = ir.train_controllers(a, model, 0, data["dstar_train"], "cpu", log)
    mc = ir.train_metacontroller(a, model, data["dstar_train"], "cpu", log, seed=0, steps=a.mc_steps)
    assert controlled_nll(model, ctrl, 0, held) < base - 0.004          # measured: -0.010
    assert ir.switch_alignment(model, mc, held, args.n_layer // 2, "cpu")["nll"] < base - 0.004   # -0.007


def test_results_have_the_same_keys_with_the_diagnostic_off(tmp_path):
    """--no-ctrl-oracle (the quick preset's setting) writes the diagnostic's keys as None, so a quick run's
    results.json has the default run's keys."""
    args = tiny_args(out=str(tmp_path), ctrl_layers="mid", ctrl_steps=2, n_eval=4)
    data, model = ir.make_datasets(args), ir.GPT(args).eval()
    on, off = (ir.controller_stage(dataclasses.replace(args, ctrl_oracle=o), model, data, "cpu", ir.Logger(args.out))
               for o in (True, False))
    assert set(on["metrics"]) == set(off["metrics"]) and off["metrics"]["controller_success_oracle"] is None
    assert 0 <= on["metrics"]["controller_success_oracle"] <= 1 and not ir.PRESETS["grid"]["quick"]["ctrl_oracle"]


def test_controller_training_touches_only_the_controller(tmp_path):
    args = tiny_args(out=str(tmp_path))
    torch.manual_seed(0)
    model = ir.GPT(args)                                    # not frozen by the caller: the stage must do it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eps = ir.generate_episodes(np.random.default_rng(1), 32, gw.PRETRAIN_TASKS, 0.0)
    ctrl = ir.train_controllers(args, model, 1, eps, "cpu", ir.Logger(args.out))
    assert all(p.grad is None for p in model.parameters())                  # no gradient reached the base
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ctrl.A.grad is not None and ctrl.A.abs().sum() > 0               # the controller did train


def test_a_layers_controllers_do_not_depend_on_which_layers_were_trained_before(tmp_path):
    args = tiny_args(out=str(tmp_path), ctrl_steps=3)
    torch.manual_seed(0)
    model = ir.GPT(args)
    eps = ir.generate_episodes(np.random.default_rng(1), 32, gw.PRETRAIN_TASKS, 0.0)
    train = lambda layer: ir.train_controllers(args, model, layer, eps, "cpu", ir.Logger(args.out)).state_dict()
    alone = train(1)                                        # --ctrl-layers mid
    train(0)                                                # --ctrl-layers all: layer 0 first, then layer 1
    after = train(1)
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    assert not torch.equal(train(0)["B"], alone["B"])       # each layer draws its own start


def test_probe_finds_a_planted_signal():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (2000,))
    x = torch.randn(2000, 16)
    x[:, 3] += 4.0 * y.float()                      # subgoal linearly decodable from one direction
    acc = ir.train_probe(x[:1000], y[:1000], x[1000:], y[1000:], steps=300, lr=5e-2)
    noise = torch.randn(2000, 256)                  # wide enough to fit noise: scoring the fitted half would pass
    chance = ir.train_probe(noise[:1000], y[:1000], noise[1000:], y[1000:], steps=300, lr=5e-2)
    assert acc > 0.9 and chance < 0.35


# ------------------------------------------------------------------------------------- the program
# One tiny grid run of every stage, shared by the tests below (each works on its own copy of the folder).
STAGE_CKPTS = ("pretrain", "probe", "controllers", "metacontroller", "token_rl", "internal_rl", "internal_rl_no_temporal")
RUN = TINY + ["--pretrain-steps", "20"]
RUN_FIGURES = [f for f in ir.FIGURES if f != "rate_distortion.png"]           # a run's figures; the sweep's is apart


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grid") / "run")
    return out, ir.main(RUN + ["--out", out])


@pytest.fixture
def run_copy(grid_run, tmp_path, monkeypatch):
    """A copy of the shared run folder and a function rerunning main() on it (figures off: they take seconds)."""
    out = str(tmp_path / "run")
    shutil.copytree(grid_run[0], out)
    monkeypatch.setattr(ir, "make_figures", lambda args, results: [])
    return out, lambda *extra: ir.main(RUN + ["--out", out] + list(extra))


def saved_results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not JSON"))


def test_end_to_end_tiny_run(grid_run):
    out, res = grid_run
    assert res["stage_status"] == dict.fromkeys(STAGE_CKPTS, "trained")
    assert saved_results(out) == json.loads(json.dumps(ir.finite(res)))          # what main() returned, as JSON
    L1, mid = 3, 1                                                              # TINY: 2 blocks, layers 0..2
    assert res["pretrain"]["steps"] == 20 and len(res["pretrain"]["curve"]) == 1 and res["args"]["preset"] == "quick"
    assert len(res["probe_accuracy"]) == L1 and res["probe_gap_mid"] == res["probe_accuracy"][mid] - res["probe_accuracy"][0]
    for key in ("controller_success", "controller_success_pretrain"):   # success rates of 16 episodes per layer
        assert len(res[key]) == L1 and all(abs(16 * x - round(16 * x)) < 1e-6 for x in res[key])
    assert 0 <= res["controller_success_oracle"] <= 1
    inj = res["injection"]                                                      # 4 x 16 prior codes, 16 per test
    assert set(inj) == {"codes_per_pair", "in", "ood"} and sum(inj["codes_per_pair"]) <= 64
    assert all(v is None or (len(v) == 2 and all(abs(16 * x - round(16 * x)) < 1e-6 for x in v)) for v in (inj["in"], inj["ood"]))
    assert res["switch_collapse"] == ir.collapse_verdict(res["switch_rate"], res["mc_kl"])
    for method in ("token_rl", "internal_rl", "internal_rl_no_temporal"):
        m = res[method]
        assert m["episodes"] == 32 and [c[0] for c in m["curve"]] == [16, 32] and m["success"] == 0.0
    assert res["internal_rl_no_temporal"]["decisions_per_episode"] > res["internal_rl"]["decisions_per_episode"] >= 1
    for fig in RUN_FIGURES:
        assert os.path.exists(os.path.join(out, fig))
    assert not os.path.exists(os.path.join(out, "rate_distortion.png"))        # only --sweep makes it


def test_rerun_reuses_stages_and_a_setting_retrains_only_what_reads_it(run_copy, grid_run):
    out, run = run_copy
    res = run()
    assert res["stage_status"] == dict.fromkeys(STAGE_CKPTS, "reused")
    assert numbers(res) == numbers(grid_run[1]) and res["pretrain"] == grid_run[1]["pretrain"]   # loaded, not re-made
    status = run("--ctrl-steps", "5")["stage_status"]                          # only the controllers read it
    assert [k for k, v in status.items() if v == "trained"] == ["controllers"]
    status = run("--ctrl-steps", "5", "--irl-lr", "1e-2")["stage_status"]      # internal RL, not token-level RL
    assert [k for k, v in status.items() if v == "trained"] == ["internal_rl", "internal_rl_no_temporal"]


def test_stop_after_keeps_later_results_that_still_fit_and_drops_the_rest(grid_run, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(grid_run[0], out)
    res = ir.main(RUN + ["--out", out, "--stop-after", "pretrain"])
    assert res["stage_status"] == {"pretrain": "reused", **dict.fromkeys(STAGE_CKPTS[1:], "kept")}
    assert res["switch_f1"] == grid_run[1]["switch_f1"] and saved_results(out)["internal_rl"] == grid_run[1]["internal_rl"]
    assert all(os.path.exists(os.path.join(out, f)) for f in RUN_FIGURES)
    capsys.readouterr()
    res = ir.main(RUN + ["--out", out, "--stop-after", "probe", "--warmup", "5"])   # a new base model
    assert res["stage_status"] == {"pretrain": "trained", "probe": "trained"}
    assert "switch_f1" not in saved_results(out) and "token_rl" not in res
    assert "leaves out those that no longer fit: controllers, metacontroller, token_rl, internal_rl, " \
           "internal_rl_no_temporal" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "beta_traces.png")) and os.path.exists(os.path.join(out, "probe_accuracy.png"))


def numbers(results: dict):
    """A run's results without what differs between identical runs: times, the folder, the stage status."""
    if isinstance(results, dict):
        return {k: numbers(v) for k, v in results.items() if k not in (
            "args", "stage_status", "stage_time_s", "wall_time_s", "train_time_s", "data_wait_fraction", "minutes")}
    return [numbers(v) for v in results] if isinstance(results, list) else results


def test_a_retrained_parent_retrains_its_children(run_copy, grid_run):
    out, run = run_copy
    os.remove(os.path.join(out, "pretrain.pt"))                # retrained with the same settings and seed
    res = run()
    assert res["stage_status"] == dict.fromkeys(STAGE_CKPTS, "trained")
    assert numbers(res) == numbers(grid_run[1])                # deterministic: the same numbers again
    os.remove(os.path.join(out, "metacontroller.pt"))
    status = run()["stage_status"]
    assert [k for k, v in status.items() if v == "trained"] == ["metacontroller", "internal_rl", "internal_rl_no_temporal"]
    assert run("--fresh", "--stop-after", "probe")["stage_status"] == {"pretrain": "trained", "probe": "trained"}
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.pt"))) == ["pretrain.pt", "probe.pt"]


def flip_a_stored_byte(path: str) -> None:
    """Flip one byte in the middle of a checkpoint's first stored tensor (its pickled metrics if it has none),
    in place: torch.load does not check the zip's CRC, so only the checkpoint's own checksum can notice."""
    with zipfile.ZipFile(path) as z:
        entries = z.infolist()
    entry = next((e for e in entries if "/data/" in e.filename), None) or next(e for e in entries if e.filename.endswith(".pkl"))
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("name", STAGE_CKPTS)
def test_a_flipped_byte_in_any_checkpoint_is_named_and_never_used(run_copy, name):
    out, run = run_copy
    path = os.path.join(out, f"{name}.pt")
    flip_a_stored_byte(path)
    with pytest.raises(SystemExit) as e:
        run()
    assert path in str(e.value) and "delete it" in str(e.value) and "\n" not in str(e.value)
    assert "is corrupt" in str(e.value) or "cannot read" in str(e.value)


def test_an_unreadable_checkpoint_is_reported_with_the_fix(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "pretrain.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        ir.main(TINY + ["--pretrain-steps", "5", "--out", out, "--stop-after", "pretrain"])
    assert "pretrain.pt" in str(e.value) and "delete it" in str(e.value)


def load_copy(path: str, name: str):
    """Import a copy of internal_rl.py as its own module (its own code, so its own fingerprints)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                               # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    module.make_figures = lambda args, results: []
    return module


def test_editing_a_stage_retrains_it_and_what_builds_on_it(tmp_path):
    """Reuse is keyed on the code: a changed line of the metacontroller's loss retrains the metacontroller and
    internal RL (token-level RL does not use it); a changed line of pretraining retrains everything; comments
    and figure code retrain nothing."""
    src, out = open(os.path.join(HERE, "internal_rl.py")).read(), str(tmp_path / "run")

    def run(code: str, i: int) -> dict:
        path = str(tmp_path / f"irl_copy{i}.py")
        with open(path, "w") as f:
            f.write(code)
        status = load_copy(path, f"irl_copy{i}").main(RUN + ["--out", out])["stage_status"]
        return sorted(k for k, v in status.items() if v == "trained")

    assert run(src, 0) == sorted(STAGE_CKPTS)
    edits = [("    import matplotlib.pyplot as plt\n", "    import matplotlib.pyplot as plt      # a new comment\n"),  # figures
             ("        loss = loss_a + args.obs_coef * loss_o",
              "        # a comment in pretraining\n        loss = loss_a + args.obs_coef * loss_o"),
             ('    """Eq. 3 with lambda = 0 on a D* batch', '    """(a docstring edit) Eq. 3 with lambda = 0 on a D* batch')]
    for old, new in edits:
        assert src.count(old) == 1
        src = src.replace(old, new)
    assert run(src, 1) == []
    old = "    return nll + alpha * kl_mean, nll, kl_mean, beta, mask"
    assert src.count(old) == 1
    src = src.replace(old, old.replace("alpha * kl_mean", "0.5 * alpha * kl_mean"))
    assert run(src, 2) == ["internal_rl", "internal_rl_no_temporal", "metacontroller"]
    old = "        loss = loss_a + args.obs_coef * loss_o"
    src = src.replace(old, old.replace("args.obs_coef", "2 * args.obs_coef"))
    assert run(src, 3) == sorted(STAGE_CKPTS)


def test_a_diverging_run_stops_with_one_line_and_valid_results(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        ir.main(TINY + ["--pretrain-steps", "20", "--lr", "1e4", "--warmup", "1", "--grad-clip", "1e9", "--out", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert re.search(r"\[6 pretrain\] step \d+: the (loss|gradient norm) is (nan|inf).*smaller --lr \(now 10000.0\)", err)
    res = saved_results(out)
    assert res["stopped"] in err and "pretrain" not in res["stage_status"] and not glob.glob(os.path.join(out, "*.tmp"))
    for flag in ("inf", "nan", "-inf"):                     # a non-finite setting never starts a run
        with pytest.raises(SystemExit) as e:
            ir.main(TINY + [f"--lr={flag}", "--out", out])
        assert "--lr must be a finite number" in str(e.value)
    assert saved_results(out)["stopped"] in err                # results.json untouched


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_a_bad_out_folder_is_one_line(tmp_path, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = {"file": str(a_file), "under_file": str(a_file / "run"), "unwritable": "/sys/internal_rl_test_run"}[where]
    if where == "unwritable" and os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("/sys is writable here")
    with pytest.raises(SystemExit) as e:
        ir.main(TINY + ["--out", out])
    assert str(e.value).startswith(f"internal_rl.py: error: --out {out}: cannot use it") and "\n" not in str(e.value)


def test_an_interrupted_checkpoint_write_leaves_nothing_half_written(grid_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(grid_run[0], out)
    before = open(os.path.join(out, "pretrain.pt"), "rb").read()

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(ir.torch, "save", interrupted_save)
    with pytest.raises(SystemExit) as e:                     # a changed setting: pretraining reruns and is cut off
        ir.main(RUN + ["--out", out, "--warmup", "5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and len(err.splitlines()) == 1 and "rerun the same command" in err
    assert open(os.path.join(out, "pretrain.pt"), "rb").read() == before and not glob.glob(os.path.join(out, "*.tmp"))
    assert saved_results(out)["stopped"] in err


def test_ctrl_c_during_pretraining_says_what_is_kept_and_the_rerun_continues(tmp_path, monkeypatch, capsys):
    """A real SIGINT, sent to this process right after pretraining logs step 30, then one as the probes start:
    the second run keeps the finished pretraining, and a third reuses it and finishes the probes."""
    out = str(tmp_path / "run")
    argv = TINY + ["--pretrain-steps", "60", "--eval-every", "20", "--log-every", "10", "--stop-after", "probe",
                   "--out", out]
    log = ir.Logger.__call__

    def log_then_ctrl_c(self, stage, msg, **metrics):
        log(self, stage, msg, **metrics)
        if "step 30/60" in msg:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(ir.Logger, "__call__", log_then_ctrl_c)
    monkeypatch.setattr(ir, "make_figures", lambda args, results: [])
    with pytest.raises(SystemExit) as e:
        ir.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and len(err.splitlines()) == 1
    assert "interrupted; finished stages: none" in err and "rerun the same command to continue" in err
    assert not glob.glob(os.path.join(out, "*.tmp")) and saved_results(out)["stopped"] in err
    assert not os.path.exists(os.path.join(out, "pretrain.pt"))            # nothing half-trained is kept

    def ctrl_c_in_probes(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(ir.Logger, "__call__", log)
    monkeypatch.setattr(ir, "train_probe", ctrl_c_in_probes)
    with pytest.raises(SystemExit) as e:
        ir.main(argv)                                        # the same command again: pretraining finishes
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "interrupted; finished stages: pretrain (checkpoints in" in err
    monkeypatch.undo()
    monkeypatch.setattr(ir, "make_figures", lambda args, results: [])
    res = ir.main(argv)
    assert res["stage_status"] == {"pretrain": "reused", "probe": "trained"} and res["pretrain"]["steps"] == 60


@pytest.mark.parametrize("argv, needle", [
    (["--task", "maze"], "valid choices: grid, ant"),
    (["--stop-after", "nope"], "valid choices: pretrain, probe, controllers, metacontroller, rl"),
    (["--n-embd", "0"], "must be positive"),
    (["--ctrl-layers", "9"], "0..4"),
    (["--ctrl-layers", "x"], "0..4"),
    (["--seed", "-1"], "non-negative"),
    (["--cooldown", "2"], "[0, 1]"),
    (["--device", "tpu"], "valid choices: auto, cpu"),
    (["--task", "ant", "--n-train", "0"], "--n-train must be positive"),
    (["--n-train", "5"], "--n-train is for the ant"),
    (["--action-noise", "0.1"], "--action-noise is for the ant"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--task", "ant", "--stop-after", "nope"], "valid choices: pretrain"),
    (["--ctrl-rank", "0"], "full rank) is for the ant"),
    (["--obj-attn", "5"], "--obj-attn must be"),
    (["--obj-attn", "top"], "--obj-attn must be '', 'last' or layers in 1..4"),
    (["--task", "ant", "--obj-attn", "2"], "--obj-attn is for the grid"),
    (["--n-dstar", "100"], "--n-probe (4000) must be at most --n-dstar (100)"),
    (["--preset", "huge"], "unknown --preset 'huge'; valid choices: default, quick, paper"),
    (["--task", "ant", "--preset", "paper"], "unknown --preset 'paper'; valid choices: default, quick"),
    (["--task", "ant", "--fast-expert"], "--fast-expert is for the grid"),
    (["--task", "ant", "--epsilon", "0.1"], "--epsilon is for the grid; the ant's expert noise is --action-noise"),
    (["--workers", "3"], "--workers is for the ant; the grid draws fresh expert episodes every step (--workers: with"),
])
def test_bad_input_exits_with_one_line(argv, needle):
    with pytest.raises(SystemExit) as e:
        ir.parse_args(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_paper_preset_help_shows_the_papers_values_and_their_tables(capsys):
    with pytest.raises(SystemExit):
        ir.parse_args(["--task", "grid", "--preset", "paper", "--help"])
    text = " ".join(capsys.readouterr().out.split())                    # argparse wraps the lines
    for needle in ("(Table A4: 6) (default 6)", "(Table A4: 256) (default 256)", "(Table A16: 512 = 2 * 256) (default 2)",
                   "(Table A4: 1024) (default 1024)", "(Table A4: 256,000) (default 256000)", "(Table A4: 3e-4 at batch "
                   "1024) (default 0.0003)", "(Table A6: 8,000 at batch 512) (default 8000)", "(Table A7: 3200 at batch "
                   "512) (default 3200)", "(Table A9: 64,000 at batch 512) (default 64000)", "(Table A9: 512) (default "
                   "512)", "(Table A13: 1024) (default 1024)", "(Table A13: 3e-5) (default 3e-05)"):
        assert needle in text, needle
    args = ir.parse_args(["--task", "grid", "--preset", "paper"])
    assert args.out == os.path.join("runs", "grid-seed0-paper") and args.fast_expert and args.obj_attn == "last"


def test_paper_preset_runs_every_stage_on_the_cpu(tmp_path):
    """--preset paper (6 blocks of width 256, the fast expert) through every stage, its budgets cut to a few steps;
    --pretrain-minutes stops pretraining at the first evaluation past the limit."""
    cut = dict(batch_size=8, bucket_batches=1, pretrain_steps=50, eval_every=2, pretrain_minutes=1e-9, n_heldout=8,
               n_dstar=24, n_probe=24, probe_steps=3, ctrl_steps=2, ctrl_batch=4, ctrl_layers="mid", n_eval=4,
               mc_steps=2, mc_batch=4, rl_episodes=8, rl_batch=4, rl_eval=4, workers=1, log_every=1000)
    r = ir.main(["--task", "grid", "--preset", "paper", "--out", str(tmp_path / "run")]
                + [x for k, v in cut.items() for x in ("--" + k.replace("_", "-"), str(v))])
    assert r["args"]["n_layer"] == 6 and r["args"]["n_embd"] == 256 and r["pretrain"]["n_params"] > 3.5e6
    assert r["pretrain"]["steps"] == 2 and [c["step"] for c in r["pretrain"]["curve"]] == [2]
    assert 0 < r["pretrain"]["data_wait_fraction"] < 1                  # (workers = 1: it makes its batches itself)
    assert len(r["probe_accuracy"]) == 7 and r["controller_success"][3] is not None
    assert all(r[m]["episodes"] == 8 for m in ("token_rl", "internal_rl", "internal_rl_no_temporal"))


def test_bad_task_from_the_command_line_has_no_traceback():
    p = subprocess.run([sys.executable, os.path.join(HERE, "internal_rl.py"), "--task", "maze"],
                       capture_output=True, text=True, cwd=HERE, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "valid choices: grid, ant" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------- the pipeline on the ant
ANT_TINY = ["--task", "ant", "--n-embd", "32", "--n-layer", "2", "--n-head", "2", "--n-train", "6", "--n-heldout", "2",
            "--n-dstar", "4", "--batch-size", "4", "--bucket-batches", "1", "--warmup", "2", "--log-every", "1000",
            "--eval-every", "1000", "--n-probe", "4", "--probe-steps", "10",
            "--ctrl-steps", "3", "--ctrl-batch", "2", "--n-eval", "2", "--workers", "1", "--expert-eval", "2",
            "--mc-steps", "2", "--mc-batch", "2", "--rl-episodes", "4", "--rl-batch", "2", "--rl-eval", "2"]


def test_ant_model_is_causal_and_its_gaussian_head_matches_torch():
    args = ir.parse_args(["--task", "ant", "--n-embd", "32", "--n-layer", "2", "--n-head", "2"])
    torch.manual_seed(0)
    model = ir.GPT(args).eval()
    obs, actions = torch.randn(3, 12, at.OBS_DIM), torch.rand(3, 12, 8) * 2 - 1
    mean, nxt, res = model(obs)
    assert mean.shape == (3, 12, 8) and nxt.shape == (3, 12, at.OBS_DIM) and len(res) == 3
    changed = obs.clone()
    changed[:, 7:] += 1.0                                                   # change every step after t = 6
    mean2, _, _ = model(changed)
    assert torch.equal(mean[:, :7], mean2[:, :7]) and not torch.allclose(mean[:, 7:], mean2[:, 7:])
    ref = torch.distributions.Normal(mean, model.log_std.exp()).log_prob(actions).sum(-1)    # (3, 12)
    assert torch.allclose(model.action_logp(mean, actions), ref, atol=1e-5)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 5:] = False
    assert torch.allclose(model.action_nll(mean, actions, mask), -ref[mask].mean(), atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([model.sample(mean[:, 0], gen) for _ in range(2000)])               # (2000, 3, 8)
    assert torch.allclose(draws.mean(0), mean[:, 0], atol=0.05)
    assert torch.allclose(draws.std(0).mean(), model.log_std.exp().mean(), rtol=0.1)


def test_grid_action_nll_is_the_cross_entropy(model_and_batch):
    _, model, b = model_and_batch
    logits, _, _ = model(b["obs"])
    ref = F.cross_entropy(logits.flatten(0, 1), b["actions"].flatten(), ignore_index=-1)       # padding: -1
    assert torch.allclose(model.action_nll(logits, b["actions"], b["mask"]), ref)


def test_ant_data_do_not_depend_on_the_number_of_workers(tmp_path, monkeypatch, ant_env):
    monkeypatch.setattr(at, "DATA_CHUNK", 2)                      # several chunks per set, cheaply
    sets = []
    for w in (1, 2, 2):                                           # the second w = 2 reloads data.pt
        args = ir.parse_args(ANT_TINY + ["--n-train", "5", "--workers", str(w), "--out", str(tmp_path / f"w{min(w, 2)}")])
        sets.append(ir.make_datasets(args, ir.Logger(args.out)))
    # the first chunk of D, generated directly, is what the sets hold
    seed = int(np.random.SeedSequence(0).spawn(6)[0].spawn(3)[0].generate_state(1)[0])
    direct, tries, wins = at.expert_chunk((seed, 2, 0.03, False))
    assert wins == 2 <= tries
    for name, n in (("train", 5), ("heldout", 2), ("dstar_train", 4), ("dstar_heldout", 4)):
        assert len(sets[0][name]) == len(sets[1][name]) == len(sets[2][name]) == n
        for a, b, c in zip(*(s[name] for s in sets)):
            assert len(a["obs"]) == len(a["actions"]) + 1 == len(a["subgoals"]) + 1
            for k in ("obs", "actions", "subgoals"):
                assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k])
    for ep, ref in zip(sets[0]["train"][:2], direct):
        assert all(np.array_equal(ep[k], ref[k]) for k in ("obs", "actions", "subgoals"))
    assert sets[0]["eval_seed"] == sets[1]["eval_seed"] and sets[0]["expert"] == sets[1]["expert"]
    assert 0 < sets[0]["expert"]["pretrain"] <= 1 and 0 <= sets[0]["expert"]["posttrain"] <= 1


def test_ant_tiny_run_of_every_stage_and_reuse(tmp_path, monkeypatch, ant_env):
    rollout = ir.rollout
    def short_rollout(*a, **kw):                      # short rollouts: an untrained ant rarely ends early
        with monkeypatch.context() as m:              # (the model keeps its 500-step capacity for the stored data)
            m.setattr(ir.env_module("ant"), "MAX_STEPS", 40)
            return rollout(*a, **kw)
    monkeypatch.setattr(ir, "rollout", short_rollout)
    out = str(tmp_path / "ant")
    r = ir.main(ANT_TINY + ["--pretrain-steps", "3", "--out", out])
    assert r["task"] == "ant" and len(r["probe_accuracy"]) == 3 and r["controller_success"][1] is not None
    assert r["controller_success_oracle"] is None                   # a grid-only diagnostic
    assert math.isfinite(r["pretrain"]["heldout_nll"]) and "heldout_acc" not in r["pretrain"] and os.path.exists(os.path.join(out, "data.pt"))
    assert 0 <= r["expert_success_posttrain"] <= 1 and 0 < r["expert_success_pretrain"] <= 1
    assert 0 <= r["switch_f1"] <= 1 and r["internal_rl"]["episodes"] == r["token_rl"]["episodes"] == 4
    for name in ("token_rl", "internal_rl", "internal_rl_no_temporal"):   # normalised by the expert (Fig. 8)
        assert r[name]["success_normalised"] == pytest.approx(r[name]["success"] / max(r["expert_success_posttrain"], 1e-9))
    assert r["stage_status"] == {"data": "trained", **dict.fromkeys(STAGE_CKPTS, "trained")}
    monkeypatch.setattr(ir, "make_figures", lambda args, results: [])
    r2 = ir.main(ANT_TINY + ["--pretrain-steps", "3", "--out", out])
    assert r2["stage_status"] == {"data": "reused", **dict.fromkeys(STAGE_CKPTS, "reused")}
    assert numbers(r2) == numbers(r)
    flip_a_stored_byte(os.path.join(out, "data.pt"))               # the stored episodes are checked too
    with pytest.raises(SystemExit, match="data.pt is corrupt"):
        ir.main(ANT_TINY + ["--pretrain-steps", "3", "--out", out])


# ------------------------------------------------------------------- metacontroller and internal RL
@pytest.fixture(scope="module")
def mc_setup(model_and_batch):
    args, model, b = model_and_batch
    torch.manual_seed(1)
    mc = ir.MetaController(args)
    with torch.no_grad():                     # a random decoder (the real init has A = 0, i.e. U = 0)
        mc.decoder[2].weight.normal_(0, 0.1)
        mc.decoder[2].bias.normal_(0, 0.1)
    e = model.lower(b["obs"], args.n_layer // 2).detach()
    return args, model, b, mc, e, (b["actions"] >= 0).sum(1)


def test_lower_then_upper_equals_forward_with_the_same_controller(mc_setup):
    args, model, b, mc, e, lengths = mc_setup
    z = torch.randn(e.shape[0], e.shape[1], args.n_z)
    A, Bm = mc.factors(z)
    U_e = lambda x: torch.einsum("btdr,btr->btd", A, torch.einsum("btd,btdr->btr", x, Bm))   # A (B^T e), per step
    full, _, _ = model(b["obs"], U_e, args.n_layer // 2)
    split = model.upper(e + mc.apply(z, e), args.n_layer // 2, b["obs"])
    assert torch.allclose(full, split, atol=1e-4)


def test_embedder_is_non_causal(mc_setup):
    args, model, b, mc, e, lengths = mc_setup
    z, _, _ = mc(e, lengths, sample=False)
    e2 = e.clone()
    i = int(lengths.argmax())
    e2[i, lengths[i] - 1] += 1.0                                          # change only the last real step
    z2, _, _ = mc(e2, lengths, sample=False)
    assert not torch.allclose(z[i, 0], z2[i, 0])                            # the first code already knows
    others = [j for j in range(len(lengths)) if j != i]
    assert torch.equal(z[others], z2[others])                               # other episodes untouched


def test_first_step_always_switches_and_forced_switches_everywhere(mc_setup):
    args, model, b, mc, e, lengths = mc_setup
    _, _, beta = mc(e, lengths)
    assert torch.all(beta[:, 0] == 1) and torch.all((beta >= 0) & (beta <= 1))
    _, _, beta_f = mc(e, lengths, forced=True)
    assert torch.all(beta_f == 1)


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7, 8), torch.randn(5, 7, 8)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(ir.gaussian_kl(mu, logvar), ref, atol=1e-5)
    assert ir.gaussian_kl(torch.zeros(3, 8), torch.zeros(3, 8)).abs().max() == 0      # the prior itself: 0


def test_metacontroller_training_touches_only_the_metacontroller(tmp_path):
    args = tiny_args(out=str(tmp_path), mc_steps=2)
    torch.manual_seed(0)
    model = ir.GPT(args)                                    # not frozen by the caller: the stage must do it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ir.make_datasets(args)
    mc = ir.train_metacontroller(args, model, data["dstar_train"], "cpu", ir.Logger(args.out), seed=0, steps=2)
    assert all(p.grad is None for p in model.parameters())                  # no gradient reached the base
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for part in (mc.embedder, mc.history, mc.encoder, mc.switch, mc.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_the_kl_is_charged_at_every_step_whatever_beta(mc_setup):
    """Eq. 3's KL is not weighted by beta (App. E.1; a re-implementation shipped the weighted one): switching
    almost never (beta ~ 0) or at every step (beta ~ 1) must give the same KL term."""
    args, model, b, mc, e, lengths = mc_setup
    kls = []
    for bias in (-20.0, 20.0):
        with torch.no_grad():
            mc.switch[2].bias.fill_(bias)
        torch.manual_seed(0)
        kls.append(ir.mc_loss(model, mc, b, args.n_layer // 2, alpha=0.1)[2].item())
    with torch.no_grad():
        mc.switch[2].bias.fill_(0.0)
    assert kls[0] > 0.01 and kls[0] == pytest.approx(kls[1], rel=1e-5)


def test_eq2_holds_the_code_while_beta_is_0_and_takes_the_proposal_at_1(mc_setup):
    args, model, b, mc, e, lengths = mc_setup
    proposal, _, _ = mc(e, lengths, forced=True, sample=False)             # z~_t = mu_t at every step
    with torch.no_grad():
        mc.switch[2].bias.fill_(-20.0)                                       # beta_t ~ 0 after the first step
        held, _, beta = mc(e, lengths, sample=False)
        mc.switch[2].bias.fill_(20.0)                                        # beta_t ~ 1
        taken, _, _ = mc(e, lengths, sample=False)
        mc.switch[2].bias.fill_(0.0)
    assert beta[:, 1:].max() < 1e-6 and not torch.allclose(proposal[:, 0], proposal[:, 5])
    assert torch.allclose(held, held[:, :1].expand_as(held), atol=1e-5)    # z_t = z_1 for every t
    assert torch.allclose(taken, proposal, atol=1e-5)                       # z_t = z~_t


def test_the_agents_code_samples_follow_zpolicy_log_prob(mc_setup):
    """InternalAgent samples z step by step in rollouts; ZPolicy.log_prob scores them afterwards from the
    decision sequences. Where the two agree, log pi of the samples averages the Gaussian's -entropy."""
    args, model, b, mc, e, lengths = mc_setup
    torch.manual_seed(3)
    pi = ir.ZPolicy(args)
    with torch.no_grad():
        pi.mu.weight.normal_(0, 0.5)
        pi.log_std.uniform_(-1.0, 0.0)
    n, T = 256, 12
    xs = torch.randn(n, T, args.n_embd)
    agent = ir.InternalAgent(mc, pi, n, seed=0, forced=False)                # switch bias 0: beta spread out
    for t in range(T):
        agent(xs[:, t:t + 1])
    e_dec, z_dec, mask = agent.decisions(torch.full((n,), T))
    assert 2 < mask.sum(1).float().mean() < T - 2                           # decisions at some steps only
    lp = pi.log_prob(e_dec, z_dec)[mask > 0]
    expect = -(args.n_z * 0.5 * (1 + math.log(2 * math.pi)) + pi.log_std.sum().item())
    assert abs(lp.mean().item() - expect) < 0.2


def test_rollout_switches_match_the_trained_switching_unit(mc_setup):
    """The binarised switch of a rollout (Alg. 2) is beta_t >= 0.5 of training's forward (Eq. 16), step for step,
    when both see the same codes: here a constant proposal c, which the z-policy also samples (std ~ 0)."""
    args, model, b, mc, e, lengths = mc_setup
    mc2, pi = copy.deepcopy(mc), ir.ZPolicy(args)
    c = torch.randn(args.n_z)
    with torch.no_grad():
        mc2.encoder[2].weight.zero_()
        mc2.encoder[2].bias.copy_(torch.cat([c, torch.zeros(args.n_z)]))     # mu_t = c, logvar_t = 0
        mc2.switch[2].bias.fill_(0.0)
        pi.mu.bias.copy_(c)
        pi.log_std.fill_(-30.0)
        _, _, beta = mc2(e, lengths, sample=False)
        mc2.switch[2].bias.sub_(torch.logit(beta[:, 1:].median()))           # about half the steps switch
        _, _, beta = mc2(e, lengths, sample=False)                         # training: z_{t-1} = c
    agent = ir.InternalAgent(mc2, pi, e.shape[0], seed=0, forced=False)
    for t in range(e.shape[1]):
        agent(e[:, t:t + 1])
    decide = torch.stack([d for d, _, _ in agent.trace], 1)                  # (B, T)
    real = ir.step_mask(lengths, e.shape[1]).bool() & ((beta - 0.5).abs() > 1e-4)
    real[:, 0] = False                                                       # (t = 1 always switches in both)
    assert torch.equal(decide[real], (beta >= 0.5)[real])
    assert decide[real].any() and not decide[real].all()


@pytest.fixture
def unfrozen(mc_setup):
    """Copies of the fixture's base model and metacontroller that nobody has frozen."""
    args, model, b, mc, e, lengths = mc_setup
    return args, copy.deepcopy(model).requires_grad_(True), copy.deepcopy(mc).requires_grad_(True)


def test_internal_rl_update_makes_rewarded_codes_likelier_and_touches_only_the_policy(unfrozen, monkeypatch, tmp_path):
    """A planted reward pays for episodes whose first code has z_1 > 0 (a half-space); one update of the real
    internal_rl() must raise the policy's probability of that half-space, and nothing but the policy trains."""
    args, model, mc = unfrozen
    before = {k: v.clone() for k, v in {**model.state_dict(), **{"mc." + k: v for k, v in mc.state_dict().items()}}.items()}
    real = ir.rollout

    def planted(*a, ctrl_fn=None, **kw):
        r = real(*a, ctrl_fn=ctrl_fn, **kw)
        r["rewards"] = (ctrl_fn.trace[0][2][:, 0] > 0).float()                # the codes of the first decision
        return r
    monkeypatch.setattr(ir, "rollout", planted)
    a = ir.Args(**{**args.__dict__, "rl_episodes": 64, "rl_batch": 64, "rl_eval": 8, "irl_lr": 0.03})   # one batch
    ck = ir.internal_rl(a, model, mc, {"eval_seed": 0}, "cpu", ir.Logger(str(tmp_path)), forced=False)
    assert ck["metrics"]["curve"][0][1] > 0.2                              # the batch had rewarded episodes
    pi = ir.ZPolicy(a)
    pi.load_state_dict(ck["policy"])
    e0 = real(model, [gw.POSTTRAIN_TASK], 32, 5, "cpu", record=True)["obs"][:, :1]
    with torch.no_grad():
        out, _ = pi.gru(model.lower(e0, args.n_layer // 2))
        p_half = torch.distributions.Normal(0.0, 1.0).cdf(pi.mu(out[:, 0])[:, 0] / pi.log_std.exp()[0])
    assert p_half.min() > 0.52                                               # 0.5 before the update
    after = {**model.state_dict(), **{"mc." + k: v for k, v in mc.state_dict().items()}}
    assert all(torch.equal(before[k], v) for k, v in after.items())
    assert all(p.grad is None for p in list(model.parameters()) + list(mc.parameters()))


def test_token_rl_trains_a_copy_and_leaves_the_frozen_base_untouched(unfrozen, monkeypatch, tmp_path):
    args, model, _ = unfrozen
    model.requires_grad_(False)                                              # as main() hands it over
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = ir.rollout

    def planted(*a, **kw):
        r = real(*a, **kw)
        if "rewards" in r:                                                   # training batches, not the test
            r["rewards"] = (torch.arange(len(r["rewards"])) % 2 == 0).float()   # every other one "succeeds"
        return r
    monkeypatch.setattr(ir, "rollout", planted)
    a = ir.Args(**{**args.__dict__, "rl_episodes": 16, "rl_batch": 16, "rl_eval": 8, "token_lr": 1e-3})
    ck = ir.token_rl(a, model, {"eval_seed": 0}, "cpu", ir.Logger(str(tmp_path)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not all(torch.equal(before[k], ck["policy"][k]) for k in before)    # the copy did train


def test_code_injection_keeps_named_codes_and_injects_them_on_time(monkeypatch):
    # App. B.3.2: prior codes bucketed by the pair their episode completed first; each injection run is paired with
    # the model alone on the same tasks and env seeds, and edits the stream only once the goal pair is the subgoal
    args = tiny_args(n_eval=8)
    torch.manual_seed(0)
    model, mc = ir.GPT(args).eval(), ir.MetaController(args)
    with torch.no_grad():
        mc.decoder[2].weight.normal_(0, 0.1)                                   # A != 0: every code edits the stream
    calls = []
    def fake_rollout(m, tasks, n, seed, device, ctrl_fn=None, ctrl_layer=-1, record=False):
        calls.append((list(tasks), n, seed, ctrl_fn, ctrl_layer))
        return {"success": 0.25 if ctrl_fn is None else 0.5, "visited": [2 * (i % 3 == 0) for i in range(n)]}
    monkeypatch.setattr(ir, "rollout", fake_rollout)
    out = ir.code_injection(args, model, mc, {"eval_seed": 0}, "cpu")
    first = [i for i in range(32) if i % 3 == 0]                               # the episodes that completed pair 1
    assert out["codes_per_pair"] == [sum(gw.PRETRAIN_TASKS[i % 16][0] == 2 * q for i in first) for q in range(4)]
    assert out["in"] == out["ood"] == [0.25, 0.5]
    tasks0, n0, _, held, layer = calls[0]
    assert tasks0 == list(gw.PRETRAIN_TASKS) and n0 == 32 and layer == args.n_layer // 2
    x0 = torch.randn(args.n_embd)
    edits = held(x0.expand(32, 1, -1), None)[:, 0]                             # (32, D): each prior code's U(z) x0
    seen = {(t[k] // 2, t[k + 2] // 2) for t in gw.PRETRAIN_TASKS for k in (0, 2)}
    for (tasks, n, seed, alone, _), (tasks_i, n_i, seed_i, inject, _), ood in ((calls[1], calls[2], False), (calls[3], calls[4], True)):
        assert alone is None and (tasks, n, seed) == (tasks_i, n_i, seed_i)   # same layouts, same action noise
        assert all((t[0] // 2, t[2] // 2) not in seen if ood else (t[0] // 2, t[2] // 2) in seen for t in tasks)
        p = torch.tensor([tasks[i % len(tasks)][0] // 2 for i in range(n)])[:, None]
        g = torch.tensor([tasks[i % len(tasks)][2] // 2 for i in range(n)])[:, None]
        assert torch.equal(inject(x0.expand(n, 1, -1), p), torch.zeros(n, 1, args.n_embd))   # before: no edit
        after = inject(x0.expand(n, 1, -1), g)[:, 0]                           # (n, D) once pair g is the subgoal
        for i in range(n):                                    # the code injected names g: one that completed it first
            named = [j for j in first if gw.PRETRAIN_TASKS[j % 16][0] == 2 * int(g[i])]
            assert any(torch.allclose(after[i], edits[j], atol=1e-6) for j in named)


def test_switching_unit_and_policy_are_causal(mc_setup):
    args, model, b, mc, e, lengths = mc_setup
    torch.manual_seed(2)
    pi = ir.ZPolicy(args)
    with torch.no_grad():
        pi.mu.weight.normal_(0, 0.5)
    xs = torch.randn(4, 12, args.n_embd)
    xs2 = xs.clone()
    xs2[:, 7:] += torch.randn(4, 5, args.n_embd)                          # change the future from step 7 on
    with torch.no_grad():
        mc.switch[2].bias.fill_(0.0)                                         # beta near 0.5: some switches
    runs = []
    for x in (xs, xs2):
        agent = ir.InternalAgent(mc, pi, 4, seed=0, forced=False)
        outs = [agent(x[:, t:t + 1]) for t in range(12)]
        runs.append((torch.stack([d for d, _, _ in agent.trace], 1), torch.cat(outs, 1), agent))
    assert torch.equal(runs[0][0][:, :7], runs[1][0][:, :7])               # same switches up to step 6
    assert torch.equal(runs[0][1][:, :7], runs[1][1][:, :7])               # same controllers up to step 6
    e_dec, z_dec, mask = runs[0][2].decisions(torch.full((4,), 12))
    lp = pi.log_prob(e_dec, z_dec)
    e2 = e_dec.clone()
    e2[:, -1] += 1.0
    assert torch.equal(pi.log_prob(e2, z_dec)[:, :-1], lp[:, :-1])          # the policy is causal too
    mc2 = copy.deepcopy(mc)                           # the training path: beta_t in MetaController.forward
    with torch.no_grad():
        mc2.encoder[2].weight.zero_()                 # z~ no longer reads the (non-causal) s: only beta can leak
        mc2.encoder[2].bias.normal_()
    ef = e.clone()
    ef[:, 7:] += torch.randn_like(ef[:, 7:])
    full = torch.full((e.shape[0],), e.shape[1])
    beta, beta_f = (mc2(x, full, sample=False)[2] for x in (e, ef))
    assert torch.equal(beta[:, :7], beta_f[:, :7]) and not torch.equal(beta[:, 7:], beta_f[:, 7:])


def test_internal_agent_decides_at_switches_only(mc_setup):
    args, model, b, mc, e, lengths = mc_setup
    pi = ir.ZPolicy(args)
    for forced, bias in ((False, -20.0), (False, 20.0), (True, -20.0)):
        with torch.no_grad():
            mc.switch[2].bias.fill_(bias)                                    # beta ~ 0 or ~ 1 everywhere
        agent = ir.InternalAgent(mc, pi, 8, seed=0, forced=forced)
        r = ir.rollout(model, [gw.POSTTRAIN_TASK], 8, 0, "cpu", ctrl_fn=agent, ctrl_layer=args.n_layer // 2, record=True)
        _, _, mask = agent.decisions(r["lengths"])
        expect = torch.ones(8) if (bias < 0 and not forced) else r["lengths"].float()
        assert torch.equal(mask.sum(1), expect)                              # 1 decision, or one per step
    with torch.no_grad():
        mc.switch[2].bias.fill_(0.0)


def test_trajectory_advantage_and_ppo_loss_match_a_slow_loop():
    torch.manual_seed(0)
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    adv = ir.trajectory_advantage(R)
    mean, std = R.mean().item(), float(np.std(R.numpy()))                    # population std
    assert torch.allclose(adv, (R - mean) / (std + 1e-3))
    logp, logp_old = torch.randn(5, 6), torch.randn(5, 6)
    mask = (torch.rand(5, 6) > 0.3).float()
    total, count = 0.0, 0
    for i in range(5):
        for t in range(6):
            if mask[i, t]:
                rho = float(np.exp(logp[i, t].item() - logp_old[i, t].item()))
                total += min(rho * adv[i].item(), min(max(rho, 0.8), 1.2) * adv[i].item())
                count += 1
    assert abs(ir.ppo_loss(logp, logp_old, adv, mask, 0.2).item() - (-total / count)) < 1e-5


def test_collapse_verdicts():
    assert "sends nothing" in ir.collapse_verdict(0.0, 0.0)
    assert "never switches" in ir.collapse_verdict(0.0, 0.07)               # the task in the first code
    assert "every step" in ir.collapse_verdict(0.95, 0.5)
    assert ir.collapse_verdict(0.06, 0.2) == "sparse switching"


def test_rl_update_makes_rewarded_episodes_more_likely(model_and_batch):
    args, model, b = model_and_batch
    policy = ir.copy.deepcopy(model).requires_grad_(True)
    r = ir.rollout(policy, [gw.POSTTRAIN_TASK], 16, 0, "cpu", record=True)
    batch = {"obs": r["obs"], "actions": r["actions"], "mask": ir.step_mask(r["lengths"], r["actions"].shape[1]),
             "rewards": torch.tensor([1.0, 0.0] * 8)}                         # pretend every other one succeeded
    logp_fn = lambda bb: policy.action_logp(policy(bb["obs"])[0], bb["actions"])
    score = lambda: ((logp_fn(batch) * batch["mask"]).sum(1) / batch["mask"].sum(1)).detach()
    before = score()
    a = ir.Args(**{**args.__dict__, "rl_episodes": 64, "rl_batch": 16, "rl_epochs": 2, "token_lr": 1e-3})
    ir.rl_train(a, "9 test", lambda n, s: batch, logp_fn, list(policy.parameters()), "token-lr", 0, lambda *x, **k: None)
    gain = score() - before
    assert gain[0::2].mean() > 0 > gain[1::2].mean()


def test_boundary_f1_on_a_hand_made_example():
    g = torch.tensor([[0, 0, 0, 2, 2, 2, 1, 1, 1, 1]])                      # true boundaries at t = 3 and 6
    beta = torch.zeros(1, 10)
    beta[0, [0, 4, 9]] = 1.0                                                # t = 0 never counts; 4 is within 1 of 3
    out = ir.boundary_f1(beta, g, torch.tensor([10]))
    assert out["precision"] == 0.5 and out["recall"] == 0.5 and abs(out["switch_rate"] - 2 / 9) < 1e-9
    two = ir.boundary_f1([[0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]], [[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]],
                         [7, 7])                                            # episode 2 has one boundary (t = 1)
    assert two["recall"] == 2 / 3 and two["precision"] == 1.0


def test_variance_toy_code_level_estimator_has_horizon_free_variance():
    v = ir.variance_toy(0, Ks=(1, 4, 16, 64), ds=(2, 16), n=8000)
    assert v["mean_gap_se"] < 4.5                                           # both estimators unbiased: same mean
    for row, pred in zip(v["ratio"], v["predicted"]):
        assert all(b > 2 * a for a, b in zip(row, row[1:]))                 # grows with the steps K per code ...
        assert all(0.8 < x / p < 1.25 for x, p in zip(row, pred))          # ... like K ||W||_F^2 / Z (App. E.2)
    assert v["ratio"][1][0] > 4 * v["ratio"][0][0]                          # and with the action dimension d


def test_alpha_sweep_writes_every_run_reuses_the_base_model_and_is_reused(grid_run, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    shutil.copytree(grid_run[0], out)
    monkeypatch.setattr(ir, "SWEEP_ALPHAS", (0, 1))
    monkeypatch.setattr(ir, "COTRAIN_ALPHAS", (0,))
    monkeypatch.setattr(ir, "SWEEP_SEEDS", 2)
    res = ir.main(RUN + ["--out", out, "--sweep", "alpha"])
    assert res["stage_status"] == {"pretrain": "reused", "sweep": "trained", **dict.fromkeys(STAGE_CKPTS[1:], "kept")}
    with open(os.path.join(out, "sweep.json")) as f:
        sweep = json.load(f)
    assert sweep == json.loads(json.dumps(ir.finite(res["sweep"])))
    assert [(r["condition"], r["alpha"], r["seed"]) for r in sweep["runs"]] == [
        ("frozen", 0, 0), ("frozen", 0, 1000), ("frozen", 1, 0), ("frozen", 1, 1000),
        ("co-trained", 0, 0), ("co-trained", 0.1, 0)]                           # --alpha (0.1) is always co-trained
    for r in sweep["runs"]:
        assert math.isfinite(r["nll"]) and r["kl"] >= 0 and r["switches"] >= 1 and r["aligned"] == (r["f1"] >= 0.9)
    assert sweep["runs"][0]["kl"] > sweep["runs"][2]["kl"]                     # alpha = 0 sends more than alpha = 1
    assert sweep["cotrained_internal_rl"]["episodes"] == 32 and sweep["cotrain_steps"] == 3
    assert os.path.exists(os.path.join(out, "rate_distortion.png"))
    res = ir.main(RUN + ["--out", out, "--sweep", "alpha"])
    assert res["stage_status"]["sweep"] == "reused"


def test_cotraining_trains_the_base_model_and_the_frozen_run_does_not():
    args = tiny_args(seed=0)
    data = ir.make_datasets(args)
    for joint in (False, True):
        torch.manual_seed(0)
        model = ir.GPT(args)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        ir.train_metacontroller(args, model, data["dstar_train"], "cpu", lambda *a, **k: None, 0, 3, joint=joint)
        moved = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}
        assert moved == ({k for k in before if not k.startswith("obs_head")} if joint else set())  # Eq. 3: lambda = 0
        assert not any(p.requires_grad for p in model.parameters())            # frozen again afterwards
