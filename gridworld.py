"""Gridworld-pinpad (Kobayashi et al. 2025, arXiv 2512.20605, App. A.1) as a gymnasium env, plus its expert.

Contents
  1. Constants and the tasks of Table A1 (pretraining) and the post-training task
  2. Shortest-path distances (the expert's dynamic programme) and layout sampling
  3. GridPinpadEnv: the gymnasium env (spec sheet in its docstring)
  4. The expert policy, its episode generator for the datasets D and D*, and a vectorised one for large batches
     (ExpertPool: the vectorised one in worker processes, ahead of use)
  5. Registration as ``GridPinpad-v0``

Cells are numbered ``row * 7 + col`` (row 0 at the top). Everything random comes from the env's
``self.np_random`` (or, for the expert, from a ``numpy.random.Generator`` passed in), so a seed fixes
everything.
"""
from __future__ import annotations

import multiprocessing
import signal
import weakref

import numpy as np
import gymnasium as gym
from gymnasium import spaces

# ---------------------------------------------------------------------------------------------------
# 1. Constants and tasks
# ---------------------------------------------------------------------------------------------------
GRID = 7                      # G: the grid is G x G            [P A.1.2]
N_CELLS = GRID * GRID         # 49
N_COLOURS = 8                 # O: uniquely coloured cells 0..7  [P A.1.2]
N_WALLS = 4                   # W: wall cells                    [P A.1.2]
MAX_STEPS = 100               # T: episode limit                 [P A.1.2]
N_CHANNELS = N_WALLS + N_COLOURS + 1          # per cell: 4 wall channels, 8 colour channels, 1 agent channel
OBS_DIM = N_CELLS * N_CHANNELS                # 637, the paper's flat one-hot
AGENT_CHANNEL = N_CHANNELS - 1                # 12
N_SUBGOALS = 4                                # a subgoal is a colour pair 0-1, 2-3, 4-5, 6-7 -> ids 0..3

ACTION_NAMES = ("up", "down", "left", "right")
_DELTAS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _neighbour_table() -> np.ndarray:
    """NEXT[cell, action] = the cell reached by that move on an empty grid (off-grid moves stay put)."""
    nxt = np.zeros((N_CELLS, 4), dtype=np.int64)
    for cell in range(N_CELLS):
        r, c = divmod(cell, GRID)
        for a, (dr, dc) in enumerate(_DELTAS):
            rr, cc = r + dr, c + dc
            nxt[cell, a] = rr * GRID + cc if (0 <= rr < GRID and 0 <= cc < GRID) else cell
    return nxt


NEXT = _neighbour_table()
_NEXT_LIST = NEXT.tolist()    # plain lists are much faster than numpy indexing in the tight loops below

# Table A1 of the paper, verbatim: 16 six-colour tasks = 3 subgoals each (App. A.1).
PRETRAIN_TASKS = tuple(tuple(int(c) for c in s.split("-")) for s in (
    "0-1-4-5-0-1", "0-1-4-5-2-3", "0-1-6-7-2-3", "2-3-0-1-4-5", "2-3-6-7-2-3", "2-3-6-7-4-5",
    "4-5-0-1-4-5", "4-5-0-1-6-7", "4-5-2-3-6-7", "6-7-2-3-0-1", "6-7-2-3-6-7", "6-7-4-5-0-1",
    "0-1-6-7-4-5", "2-3-0-1-6-7", "4-5-2-3-0-1", "6-7-4-5-2-3"))
# The post-training (RL) task: 12 colours = 6 subgoals A B C D A B, built only from subgoal transitions
# (A->B, B->C, C->D, D->A) that never occur in pretraining [P A.1.2].
POSTTRAIN_TASK = (0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3)


def subgoal_of(colour: int) -> int:
    """Subgoal id of a colour: the pair it belongs to (0-1 -> 0, 2-3 -> 1, 4-5 -> 2, 6-7 -> 3)."""
    return colour // 2


def check_task(task, n_colours: int) -> tuple:
    """A task as a tuple of ints; anything but a non-empty sequence of ints (Python or numpy) in 0..n_colours-1
    with no colour twice in a row is a ValueError naming the rule (nothing is coerced: "012", 1.7, True)."""
    ints = not isinstance(task, (str, bytes)) and hasattr(task, "__len__") and len(task) > 0 and all(
        isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) for c in task)
    if not ints or any(not 0 <= c < n_colours for c in task) or any(a == b for a, b in zip(task, task[1:])):
        raise ValueError(f"a task is a non-empty sequence of ints 0..{n_colours - 1} (the colours, in order) with no "
                         f"colour twice in a row, got {task!r}")
    return tuple(int(c) for c in task)


def check_max_steps(max_steps) -> int:
    if isinstance(max_steps, (bool, np.bool_)) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    return int(max_steps)


def check_stepping(ended) -> None:
    """step() needs a running episode: after reset(), before the episode has ended."""
    if ended is None:
        raise RuntimeError("call reset() before step()")
    if ended:
        raise RuntimeError("the episode has ended (terminated or truncated); call reset() to start a new one")


# ---------------------------------------------------------------------------------------------------
# 2. Shortest paths and layouts
# ---------------------------------------------------------------------------------------------------
def distances_to(target: int, kind: list) -> list:
    """Exact shortest-path distance from every cell to ``target`` (the expert's dynamic programme).

    ``kind[cell]`` is -1 for an empty cell, 0..7 for a colour, 8..11 for a wall. Walls block; so does
    every colour other than the target, because stepping on it would end the episode as a failure.
    Breadth-first search is the dynamic programme V(s) = 1 + min_a V(s') for unit step costs.
    Unreachable cells get a large number. A colour cell other than the target gets the distance *from*
    it (the agent may stand on a colour it has just visited), but no path goes through it.
    """
    inf = 10 ** 6
    dist = [inf] * N_CELLS
    dist[target] = 0
    frontier = [target]
    tgt_kind = kind[target]
    while frontier:
        new = []
        for cell in frontier:
            d = dist[cell] + 1
            for nb in _NEXT_LIST[cell]:
                if dist[nb] <= d or kind[nb] >= N_COLOURS:      # already labelled, or a wall
                    continue
                dist[nb] = d
                # other colours get a distance (the agent may be standing on one it just visited) but
                # are never crossed: the search does not expand from them
                if kind[nb] == -1 or kind[nb] == tgt_kind:
                    new.append(nb)
        frontier = new
    return dist


def sample_layout(rng: np.random.Generator, task: tuple) -> tuple:
    """Sample colours, walls and the agent's start uniformly without overlap; resample until solvable.

    Solvable means: every colour of the task can be reached from where the agent will be (the start, then
    the previous colour of the task) without crossing a wall or any other colour. Returns
    ``(colour_cells[8], wall_cells[4], start_cell, kind[49], dists)`` where ``dists[c]`` is the distance map
    to colour c (only for colours of the task).
    """
    while True:
        cells = rng.permutation(N_CELLS)[:N_COLOURS + N_WALLS + 1].tolist()     # colours, walls, start
        layout = given_layout(cells[N_COLOURS:-1] + cells[:N_COLOURS] + cells[-1:], task)
        colour_cells, _, start, _, dists = layout
        pos, ok = start, True
        for c in task:
            if dists[c][pos] >= 10 ** 6:
                ok = False
                break
            pos = colour_cells[c]
        if ok:
            return layout


def given_layout(cells, task: tuple) -> tuple:
    """A layout from its 13 cells (walls 0..3, colours 0..7, the agent), as ``sample_layout`` returns one."""
    cells = [int(c) for c in cells] if len(cells) == N_WALLS + N_COLOURS + 1 else []
    if not cells or len(set(cells)) != len(cells) or not all(0 <= c < N_CELLS for c in cells):
        raise ValueError(f"a layout is 13 distinct cells in 0..{N_CELLS - 1} (walls, colours, agent), got {cells!r}")
    wall_cells, colour_cells, start = cells[:N_WALLS], cells[N_WALLS:-1], cells[-1]
    kind = [-1] * N_CELLS
    for c, cell in enumerate(colour_cells):
        kind[cell] = c
    for w, cell in enumerate(wall_cells):
        kind[cell] = N_COLOURS + w
    return colour_cells, wall_cells, start, kind, {c: distances_to(colour_cells[c], kind) for c in set(task)}


def observation_from_cells(wall_cells, colour_cells, agent: int) -> np.ndarray:
    """The paper's flat one-hot observation: (49 cells x 13 channels) -> 637 float32 values."""
    obs = np.zeros((N_CELLS, N_CHANNELS), dtype=np.float32)
    for w, cell in enumerate(wall_cells):
        obs[cell, w] = 1.0
    for c, cell in enumerate(colour_cells):
        obs[cell, N_WALLS + c] = 1.0
    obs[agent, AGENT_CHANNEL] = 1.0
    return obs.reshape(-1)


# ---------------------------------------------------------------------------------------------------
# 3. The env
# ---------------------------------------------------------------------------------------------------
class GridPinpadEnv(gym.Env):
    """Gridworld-pinpad: visit coloured cells in a task-specific order [P App. A.1].

    ## Description
    A 7x7 grid holds 8 uniquely coloured cells (colours 0..7), 4 wall cells and the agent. A *task* is a
    sequence of colours to visit in order, e.g. ``0-1-4-5-2-3``; consecutive colour pairs (0-1, 2-3, 4-5,
    6-7) are the subgoals (ids 0..3). The task is never shown to the agent: it must be inferred in context.

    ## Action Space
    ``Discrete(4)``: 0 up, 1 down, 2 left, 3 right. A move into a wall or off the grid leaves the agent
    where it is (and still costs a step).

    ## Observation Space
    ``Box(0, 1, (637,), float32)``: a flat one-hot of shape (49 cells, 13 channels), cell index
    ``row * 7 + col``:

    | channel | meaning                         |
    |---------|---------------------------------|
    | 0..3    | wall number 0..3 occupies cell  |
    | 4..11   | colour 0..7 occupies cell       |
    | 12      | the agent is in the cell        |

    Nothing about the task, the current subgoal or which colours were visited is in the observation.
    Colour and agent channels can both be 1 in one cell (the agent standing on a colour).

    ## Rewards
    1 when the last colour of the task is visited, else 0 (sparse).

    ## Starting State
    Colours, walls and the agent's start are sampled uniformly without overlap from ``self.np_random``.
    Layouts where the task cannot be completed (a needed colour walled off, or reachable only across
    another colour) are resampled, so a layout says a little about the task: a colour that cannot be reached
    is not in it.

    ## Episode End
    * Termination, success: every colour of the task visited in order (a colour counts as visited when
      the agent moves onto it from a different cell).
    * Termination, failure: the agent steps onto any colour other than the next one the task needs.
    * Truncation: 100 steps elapsed.

    ## Info
    ``subgoal`` (ground-truth current subgoal id 0..3 = pair of the next needed colour; for probes and
    analysis only, never for the agent), ``next_colour``, ``visited`` (how many of the task's colours are visited so far),
    ``success`` (bool).

    ## Arguments
    ``task``: a tuple of colours, or None (then a pretraining task is sampled at every reset);
    ``reset(options={"task": ...})`` overrides it for one episode, ``options={"layout": cells}`` (13 distinct cells
    in the order of ``cells()``: walls 0..3, colours 0..7, the agent) replaces the sampled layout (e.g. to replay an
    episode of ``expert_episodes``). ``render_mode``: "ansi" or "rgb_array".
    Nothing is coerced: a task that is not a non-empty sequence of ints in range with no colour twice in a
    row, an invalid action, or a non-positive ``max_steps`` is a ``ValueError``; ``step()`` before ``reset()``
    or after the episode has ended is a ``RuntimeError``.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, task: tuple | None = None, render_mode: str | None = None, max_steps: int = MAX_STEPS):
        self.default_task = None if task is None else check_task(task, N_COLOURS)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.max_steps = check_max_steps(max_steps)
        self.observation_space = spaces.Box(0.0, 1.0, (OBS_DIM,), dtype=np.float32)
        self.action_space = spaces.Discrete(4)
        self.task: tuple = PRETRAIN_TASKS[0]
        self.colour_cells, self.wall_cells, self.agent, self.kind = [], [], 0, [-1] * N_CELLS
        self.dists, self.progress, self.t, self.failed = {}, 0, 0, False
        self.ended = None                  # None before the first reset, True once the episode has ended

    # -- gymnasium API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and options.get("task") is not None:
            self.task = check_task(options["task"], N_COLOURS)
        elif self.default_task is not None:
            self.task = self.default_task
        else:
            self.task = PRETRAIN_TASKS[int(self.np_random.integers(len(PRETRAIN_TASKS)))]
        if options and options.get("layout") is not None:
            self.colour_cells, self.wall_cells, self.agent, self.kind, self.dists = given_layout(options["layout"], self.task)
        else:
            self.colour_cells, self.wall_cells, self.agent, self.kind, self.dists = sample_layout(self.np_random, self.task)
        self.progress, self.t, self.failed, self.ended = 0, 0, False, False
        return self._obs(), self._info()

    def step(self, action):
        check_stepping(self.ended)
        if isinstance(action, (bool, np.bool_)) or not self.action_space.contains(action):
            raise ValueError(f"an action is an int in 0..3 (0 up, 1 down, 2 left, 3 right), got {action!r}")
        nxt = _NEXT_LIST[self.agent][int(action)]
        if self.kind[nxt] >= N_COLOURS:          # a wall: stay put
            nxt = self.agent
        moved, self.agent = nxt != self.agent, nxt
        self.t += 1
        terminated, reward = False, 0.0
        colour = self.kind[nxt]
        if moved and 0 <= colour < N_COLOURS:    # a visit: moved onto a colour from a different cell
            if colour == self.task[self.progress]:
                self.progress += 1
                if self.progress == len(self.task):
                    terminated, reward = True, 1.0
            else:
                terminated, self.failed = True, True
        truncated = (not terminated) and self.t >= self.max_steps
        self.ended = terminated or truncated
        return self._obs(), reward, bool(terminated), bool(truncated), self._info()

    def render(self):
        if self.render_mode == "ansi":
            return self.render_ansi()
        if self.render_mode == "rgb_array":
            return self.render_rgb()
        return None

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def success(self) -> bool:
        return self.progress == len(self.task)

    @property
    def colour_here(self) -> int:
        """The colour of the agent's cell, -1 for none (analysis: which colour a failed episode entered)."""
        k = self.kind[self.agent]
        return k if 0 <= k < N_COLOURS else -1

    @property
    def subgoal(self) -> int:
        """Ground-truth current subgoal: the pair of the next needed colour (the last one once done)."""
        return subgoal_of(self.task[min(self.progress, len(self.task) - 1)])

    def _obs(self) -> np.ndarray:
        return observation_from_cells(self.wall_cells, self.colour_cells, self.agent)

    def _info(self) -> dict:
        nxt = self.task[self.progress] if self.progress < len(self.task) else -1
        return {"subgoal": self.subgoal, "next_colour": nxt, "visited": self.progress, "success": self.success}

    def cells(self) -> list:
        """The observation in index form: cells of walls 0..3, colours 0..7, and the agent (13 ints).

        The 637-dim one-hot has exactly one 1 per channel, so these 13 indices carry the same information;
        ``internal_rl.py`` feeds the model this form (see its section 3)."""
        return list(self.wall_cells) + list(self.colour_cells) + [self.agent]

    def render_ansi(self) -> str:
        rows = []
        for r in range(GRID):
            row = []
            for c in range(GRID):
                cell, k = r * GRID + c, self.kind[r * GRID + c]
                ch = "#" if k >= N_COLOURS else (str(k) if k >= 0 else ".")
                row.append(f"[{ch}]" if cell == self.agent else f" {ch} ")
            rows.append("".join(row))
        return "\n".join(rows) + f"\ntask {'-'.join(map(str, self.task))}  visited {self.progress}  t {self.t}\n"

    def render_rgb(self, px: int = 24) -> np.ndarray:
        img = np.full((GRID * px, GRID * px, 3), 235, dtype=np.uint8)
        for cell in range(N_CELLS):
            r, c = divmod(cell, GRID)
            k = self.kind[cell]
            colour = (60, 60, 60) if k >= N_COLOURS else (COLOUR_RGB[k] if k >= 0 else (235, 235, 235))
            img[r * px + 1:(r + 1) * px - 1, c * px + 1:(c + 1) * px - 1] = colour
        r, c = divmod(self.agent, GRID)
        q = px // 4
        img[r * px + q:(r + 1) * px - q, c * px + q:(c + 1) * px - q] = (0, 0, 0)
        return img

    # -- the expert (section 4) ------------------------------------------------------------------------
    def expert_action(self, rng: np.random.Generator, epsilon: float = 0.0) -> int:
        """Exact shortest path to the next needed colour, uniformly among all optimal actions [P C.1.1].

        With probability ``epsilon``, a uniformly random *non-terminating* action instead (one that does
        not step onto a wrong colour)."""
        return expert_action(self.agent, self.kind, self.dists[self.task[self.progress]], rng, epsilon,
                             self.task[self.progress])


COLOUR_RGB = ((230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75),
              (70, 240, 240), (0, 130, 200), (145, 30, 180), (240, 50, 230))


# ---------------------------------------------------------------------------------------------------
# 4. The expert and fast episode generation
# ---------------------------------------------------------------------------------------------------
def optimal_actions(agent: int, kind: list, dist: list, target: int) -> list:
    """All actions that move one step closer to ``target``, onto an empty cell or the target itself."""
    moves, d = _NEXT_LIST[agent], dist[agent]
    return [a for a in range(4) if dist[moves[a]] == d - 1 and (kind[moves[a]] == -1 or kind[moves[a]] == target)]


def expert_action(agent: int, kind: list, dist: list, rng: np.random.Generator, epsilon: float, target: int) -> int:
    """One expert decision given the distance map ``dist`` to the next needed colour ``target``."""
    moves = _NEXT_LIST[agent]
    if epsilon > 0.0 and rng.random() < epsilon:
        # a uniformly random action among those that do not end the episode: bumps into walls or the grid's
        # edge (no-ops) and moves onto empty cells or the target. Moves that would leave the target
        # unreachable (into a pocket entered from the colour the agent stands on) are excluded too: the
        # paper says only "non-terminating", but such a move dooms the episode to a time-out.
        safe = []
        for a in range(4):
            nxt = agent if kind[moves[a]] >= N_COLOURS else moves[a]          # a wall bump stays put
            if nxt == agent or (kind[nxt] in (-1, target) and dist[nxt] < 10 ** 6):
                safe.append(a)
        return safe[int(rng.integers(len(safe)))]
    best = optimal_actions(agent, kind, dist, target)
    return best[int(rng.integers(len(best)))] if len(best) > 1 else best[0]


def expert_episode(rng: np.random.Generator, task: tuple, epsilon: float = 0.0, max_steps: int = MAX_STEPS):
    """Roll out the expert on a fresh layout, without the gymnasium wrapper overhead.

    Follows exactly the dynamics of ``GridPinpadEnv.step`` (a test checks this). Returns a dict with
    ``cells`` (T+1, 13) int observations in index form (see ``GridPinpadEnv.cells``), ``actions`` (T,),
    ``subgoals`` (T,) ground-truth subgoal at each step, ``next_colour`` (T,) the colour the expert is
    heading to, ``optimal`` (T, 4) bool mask of all optimal actions (for diagnostics), and ``success``.
    """
    colour_cells, wall_cells, agent, kind, dists = sample_layout(rng, task)
    static = list(wall_cells) + list(colour_cells)
    agents, actions, nexts, optimal = [agent], [], [], []
    progress, success = 0, False
    for _ in range(max_steps):
        target = task[progress]
        best = optimal_actions(agent, kind, dists[target], target)
        if epsilon > 0.0:
            a = expert_action(agent, kind, dists[target], rng, epsilon, target)
        else:
            a = best[int(rng.integers(len(best)))] if len(best) > 1 else best[0]
        optimal.append([a_ in best for a_ in range(4)])
        nxt = _NEXT_LIST[agent][a]
        if kind[nxt] >= N_COLOURS:
            nxt = agent
        actions.append(a)
        nexts.append(target)
        moved, agent = nxt != agent, nxt
        agents.append(agent)
        if moved and 0 <= kind[nxt] < N_COLOURS:
            if kind[nxt] != target:
                break                      # cannot happen for epsilon-noise (non-terminating), kept for safety
            progress += 1
            if progress == len(task):
                success = True
                break
    cells = np.empty((len(agents), N_WALLS + N_COLOURS + 1), dtype=np.int64)
    cells[:, :-1] = static
    cells[:, -1] = agents
    nexts = np.asarray(nexts, dtype=np.int64)
    return {"cells": cells, "actions": np.asarray(actions, dtype=np.int64), "subgoals": nexts // 2,
            "next_colour": nexts, "optimal": np.asarray(optimal, dtype=bool), "success": success}


def expert_episodes(rng: np.random.Generator, n: int, tasks, epsilon: float = 0.0, max_steps: int = MAX_STEPS) -> list:
    """``n`` expert episodes at once, each on a task drawn uniformly from ``tasks``: numpy over all of them in
    lock-step instead of a Python loop per step, for batches the size of the paper's (1,024 episodes).

    The same law as ``expert_episode`` (tests check it), not the same random stream: layouts uniform among the
    solvable ones, the expert's exact shortest paths (``distances_to``, here one bitmask search over all layouts
    at once), ties between optimal actions broken uniformly, the same epsilon noise. Returns the same dicts."""
    return _split(n, _expert_chunks(rng, n, tasks, epsilon, max_steps))


def _expert_chunks(rng: np.random.Generator, n: int, tasks, epsilon: float, max_steps: int) -> list:
    """The lock-step expert's raw output for ``expert_episodes``: [(rows, arrays of _episodes_of)], where rows are
    the indices of the chunk's episodes among the n."""
    picks, chunks = rng.integers(len(tasks), size=n), []
    for length in sorted({len(t) for t in tasks}):          # tasks of one length step together, 1,024 at a time
        rows = [i for i in range(n) if len(tasks[picks[i]]) == length]
        for chunk in (rows[j:j + 1024] for j in range(0, len(rows), 1024)):
            task = np.array([tasks[picks[i]] for i in chunk], dtype=np.int64)              # (m, K)
            chunks.append((chunk, _episodes_of(rng, task, epsilon, max_steps)))
    return chunks


def _split(n: int, chunks: list) -> list:
    """Raw chunks -> the n episode dicts of ``expert_episode`` (int64 views into one array per chunk and field)."""
    out = [None] * n
    for rows, a in chunks:
        cells, actions, nexts = (a[k].astype(np.int64) for k in ("cells", "actions", "nexts"))
        subgoals, optimal = nexts // 2, a["optimal"]
        for j, (i, T, ok) in enumerate(zip(rows, a["length"].tolist(), a["success"].tolist())):
            out[i] = {"cells": cells[j, :T + 1], "actions": actions[j, :T], "subgoals": subgoals[j, :T],
                      "next_colour": nexts[j, :T], "optimal": optimal[j, :T], "success": ok}
    return out


def _expert_job(job: tuple):
    """One job of an ExpertPool (run in a worker process) from the random stream (seed, index): the raw chunks of n
    episodes, quick to send back, or ``prepare(episodes, rng)`` with that rng continued."""
    seed, index, n, tasks, epsilon, prepare = job
    rng = np.random.default_rng([seed, index])
    chunks = _expert_chunks(rng, n, tasks, epsilon, MAX_STEPS)
    return chunks if prepare is None else prepare(_split(n, chunks), rng)


class ExpertPool:
    """``pool()``: ``n`` fresh expert episodes from ``expert_episodes``, made ahead of use by ``workers``
    processes (``workers`` <= 1: in this process, when asked), so that pretraining at the paper's batch of 1,024
    episodes does not wait for its data. With ``prepare`` (a top-level function, so that workers can receive it),
    ``pool()`` returns ``prepare(episodes, rng)`` instead, computed in the worker (internal_rl: the padded batches).

    Call i uses the random stream ``(seed, i)`` whatever ``workers`` is: the data do not depend on the machine."""

    def __init__(self, seed: int, n: int, tasks, epsilon: float = 0.0, workers: int = 1, prepare=None, ahead: int = 2):
        self.n, self.prepare, self.calls, self.queued, self.ahead, self.pool = int(n), prepare, 0, [], ahead * workers, None
        self.job = lambda i: (int(seed), i, self.n, tuple(tasks), float(epsilon), prepare)   # call i's job
        if workers > 1:                          # spawned, not forked: safe beside CUDA and torch's threads
            ignore_ctrl_c = (signal.SIGINT, signal.SIG_IGN)     # each worker's initialiser: Ctrl-C is the run's
            self.pool = multiprocessing.get_context("spawn").Pool(workers, signal.signal, ignore_ctrl_c)
            weakref.finalize(self, self.pool.terminate)          # the workers stop with this object

    def __call__(self):
        self.calls += 1
        if self.pool is None:
            out = _expert_job(self.job(self.calls - 1))
        else:
            while len(self.queued) < self.ahead:                # keep ``ahead`` jobs in flight, in call order
                self.queued.append(self.pool.apply_async(_expert_job, (self.job(self.calls - 1 + len(self.queued)),)))
            out = self.queued.pop(0).get()
        return _split(self.n, out) if self.prepare is None else out


def _layouts(rng: np.random.Generator, task: np.ndarray) -> tuple:
    """Solvable layouts for the tasks ``task`` (m, K): cells (m, 13) in the order of ``cells()``, kind (m, 49) and
    the distance maps dist (m, 8, 49) to every colour, resampling the unsolvable rows until none is left."""
    m, inf, ar = len(task), 10 ** 6, np.arange(len(task))
    cells = np.zeros((m, N_WALLS + N_COLOURS + 1), dtype=np.int64)
    kind, dist = np.full((m, N_CELLS), -1), np.full((m, N_COLOURS, N_CELLS), inf)
    todo = ar
    while len(todo):
        k = len(todo)
        perm = np.argsort(rng.random((k, N_CELLS)), axis=1)[:, :N_COLOURS + N_WALLS + 1]   # colours, walls, start
        c = np.concatenate([perm[:, N_COLOURS:-1], perm[:, :N_COLOURS], perm[:, -1:]], 1)  # walls, colours, agent
        kd = np.full((k, N_CELLS), -1)
        kd[np.arange(k)[:, None], c[:, :N_WALLS]] = N_COLOURS + np.arange(N_WALLS)
        kd[np.arange(k)[:, None], c[:, N_WALLS:-1]] = np.arange(N_COLOURS)
        d = _distance_maps(kd, c[:, N_WALLS:-1])
        pos, ok = c[:, -1], np.ones(k, dtype=bool)
        for j in range(task.shape[1]):                      # start -> colour 1 -> colour 2 ... all reachable
            col = task[todo, j]
            ok &= d[np.arange(k), col, pos] < inf
            pos = c[np.arange(k), N_WALLS + col]
        cells[todo[ok]], kind[todo[ok]], dist[todo[ok]] = c[ok], kd[ok], d[ok]
        todo = todo[~ok]
    return cells, kind, dist


def _distance_maps(kind: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """distances_to for many layouts and targets at once: kind (k, 49), targets (k, 8) -> dist (k, 8, 49).

    The same breadth-first search on bitmasks: bit x of a uint64 is cell x, so one search layer for all k x 8
    maps is a few shifts (a move up is x -> x - 7, left is x -> x - 1 unless in column 0, ...). Walls are never
    labelled; colours other than the target are labelled but never expanded."""
    bit = lambda cells: np.left_shift(np.uint64(1), cells.astype(np.uint64))
    one_hot = lambda mask: (bit(np.arange(N_CELLS)) * mask).sum(-1, dtype=np.uint64)   # (k, 49) bool -> (k,)
    col0, col6 = one_hot(np.arange(N_CELLS) % GRID == 0), one_hot(np.arange(N_CELLS) % GRID == GRID - 1)
    full = np.uint64((1 << N_CELLS) - 1)
    free = (~one_hot(kind >= N_COLOURS) & full)[:, None]                                   # (k, 1) labelled
    empty = one_hot(kind == -1)[:, None]                                                   # (k, 1) expanded
    seen = frontier = bit(targets)                                                         # (k, 8)
    layers, s7, s1 = [seen], np.uint64(GRID), np.uint64(1)          # layers[L]: the cells within distance L
    while frontier.any():
        f = frontier & (empty | bit(targets))                                              # the cells expanded
        near = (f >> s7) | ((f << s7) & full) | ((f >> s1) & ~col6) | ((f << s1) & ~col0 & full)
        frontier = near & free & ~seen
        seen = seen | frontier
        layers.append(seen)
    count = np.zeros(targets.shape + (N_CELLS,), dtype=np.int64)      # (k, 8, 49): layers holding each cell
    for layer in layers:
        count += np.unpackbits(layer[..., None].view(np.uint8), axis=-1, bitorder="little")[..., :N_CELLS]
    return np.where(count > 0, len(layers) - count, 10 ** 6)                               # (k, 8, 49)


def _episodes_of(rng: np.random.Generator, task: np.ndarray, epsilon: float, max_steps: int) -> dict:
    """The lock-step expert on the tasks ``task`` (m, K), one fresh layout each (see expert_episodes), as padded
    int8 arrays (compact, for ExpertPool's workers to send): cells (m, S, 13), actions and target colours ``nexts``
    (m, S - 1), optimal (m, S - 1, 4), length and success (m,)."""
    m, K, inf, ar = task.shape[0], task.shape[1], 10 ** 6, np.arange(task.shape[0])
    cells, kind, dist = _layouts(rng, task)
    agent, progress = cells[:, -1].copy(), np.zeros(m, dtype=np.int64)
    alive, success, length = np.ones(m, dtype=bool), np.zeros(m, dtype=bool), np.zeros(m, dtype=np.int64)
    agents, actions = np.zeros((m, max_steps + 1), dtype=np.int64), np.zeros((m, max_steps), dtype=np.int64)
    nexts, optimal = np.zeros((m, max_steps), dtype=np.int64), np.zeros((m, max_steps, 4), dtype=bool)
    agents[:, 0] = agent
    for t in range(max_steps):
        if not alive.any():
            break
        target = task[ar, np.minimum(progress, K - 1)]                                    # (m,) next colour
        d, moves = dist[ar, target], NEXT[agent]                                           # (m, 49), (m, 4)
        dn, kn = d[ar[:, None], moves], kind[ar[:, None], moves]                           # (m, 4) each
        best = (dn == d[ar, agent][:, None] - 1) & ((kn == -1) | (kn == target[:, None]))  # optimal_actions
        choice = best
        if epsilon > 0.0:                                   # expert_action's noise: a uniform safe action
            stay = kn >= N_COLOURS
            safe = stay | (moves == agent[:, None]) | (((kn == -1) | (kn == target[:, None])) & (dn < inf))
            choice = np.where((rng.random(m) < epsilon)[:, None], safe, best)
        pick = (rng.random(m) * choice.sum(1)).astype(np.int64)                            # uniform among them
        a = (np.cumsum(choice, 1) > pick[:, None]).argmax(1)                               # (m,)
        nxt = np.where(kn[ar, a] >= N_COLOURS, agent, moves[ar, a])                        # a wall: stay put
        actions[alive, t], nexts[alive, t], optimal[alive, t] = a[alive], target[alive], best[alive]
        colour = kind[ar, nxt]
        visit = alive & (nxt != agent) & (colour >= 0) & (colour < N_COLOURS)
        agent = np.where(alive, nxt, agent)
        agents[alive, t + 1] = agent[alive]
        length += alive
        progress += visit & (colour == target)
        success |= alive & (progress == K)
        alive &= ~success & ~(visit & (colour != target))
    S = int(length.max()) + 1                                # the longest episode's observations
    cells = np.concatenate([np.broadcast_to(cells[:, None, :-1], (m, S, N_WALLS + N_COLOURS)), agents[:, :S, None]], 2)
    return {"cells": cells.astype(np.int8), "actions": actions[:, :S - 1].astype(np.int8),       # (m, S, 13), (m, S - 1)
            "nexts": nexts[:, :S - 1].astype(np.int8), "optimal": optimal[:, :S - 1], "length": length, "success": success}


# ---------------------------------------------------------------------------------------------------
# 5. Registration
# ---------------------------------------------------------------------------------------------------
if "GridPinpad-v0" not in gym.registry:
    gym.register(id="GridPinpad-v0", entry_point="gridworld:GridPinpadEnv", max_episode_steps=None)
