"""Ant-pinpad (Kobayashi et al. 2025, arXiv 2512.20605, App. A.2) as a gymnasium env, plus its expert.

The continuous-control twin of ``gridworld.py``: MuJoCo's quadruped (gymnasium's ``Ant-v5``) walks on
a floor divided into a 4x4 grid of cells, 4 of them coloured and 1 a forbidden wall cell, and must
enter the coloured cells in a task-specific order. A subgoal is a whole walk to one coloured cell.

Contents
  1. Constants, the tasks of Table A2 (pretraining) and the post-training task
  2. The arena: cell geometry, layout sampling, shortest paths over cells
  3. AntPinpadEnv: the gymnasium env (spec sheet in its docstring)
  4. The expert: a hand-designed omnidirectional trot with heading feedback, driven by a cell planner;
     the stored expert datasets of ``internal_rl.py`` (generated in parallel, seeded per chunk)
  5. Registration as ``AntPinpad-v0``

MuJoCo is imported lazily (inside the env), so ``import ant_tasks`` works without it and
``internal_rl.py`` imports this file only for ``--task ant``. Headless rendering: ``MUJOCO_GL=egl``.
Everything random comes from the env's ``self.np_random`` (or a ``numpy.random.Generator`` passed to the
expert), so a seed fixes everything.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from collections import deque

import numpy as np
import gymnasium as gym
from gymnasium import spaces

from gridworld import check_max_steps, check_stepping, check_task     # the same input rules as the grid

# Headless machines (no X display) render MuJoCo through EGL; without this, MuJoCo tries GLFW and fails.
# Must be set before MuJoCo is imported (it is imported lazily, by the env). An explicit MUJOCO_GL wins.
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

# ---------------------------------------------------------------------------------------------------
# 1. Constants and tasks
# ---------------------------------------------------------------------------------------------------
GRID = 4                      # G: the floor is G x G cells      [P A.2.2]
N_CELLS = GRID * GRID         # 16
N_COLOURS = 4                 # O: coloured cells 0..3           [P A.2.2]
N_WALLS = 1                   # W: forbidden cells               [P A.2.2]
MAX_STEPS = 500               # T: episode limit (25 s of simulated time at Ant-v5's dt = 0.05 s)
CELL_SIZE = 1.0               # metres per cell. The paper does not give it; at the
#                               expert's ~0.5 m/s, 1 m cells keep the post-training task within 500 steps.
#                               Only the ant's centre counts, so its 1.6 m leg span may cover several cells.
HEIGHT_RANGE = (0.2, 1.0)     # torso height outside this range ends the episode [P A.2.1]
N_SUBGOALS = N_COLOURS        # a subgoal is one colour                      [P "Results"]


def subgoal_of(colour: int) -> int:
    """Subgoal id of a colour: on the ant a subgoal is one colour (gridworld.py: a pair)."""
    return colour


# Table A2 of the paper, verbatim: 16 three-colour tasks (App. A.2). As in the grid, they use
# only the subgoal transitions {0->2, 0->3, 1->0, 1->3, 2->0, 2->1, 3->1, 3->2}.
PRETRAIN_TASKS = tuple(tuple(int(c) for c in s.split("-")) for s in (
    "0-3-2", "1-0-3", "2-1-0", "3-2-1", "0-2-0", "0-2-1", "0-3-1", "1-0-2",
    "1-3-1", "1-3-2", "2-0-2", "2-0-3", "2-1-3", "3-1-0", "3-1-3", "3-2-0"))
# The post-training (RL) task, built only from the never-seen transitions 0->1, 1->2, 2->3 [P A.2.2].
POSTTRAIN_TASK = (0, 1, 2, 3)

COLOUR_RGBA = ((0.90, 0.10, 0.29, 1), (0.96, 0.51, 0.19, 1), (0.24, 0.71, 0.29, 1), (0.00, 0.51, 0.78, 1))
WALL_RGBA, FLOOR_RGBA = (0.15, 0.15, 0.15, 1), (0.85, 0.85, 0.80, 1)


# ---------------------------------------------------------------------------------------------------
# 2. The arena
# ---------------------------------------------------------------------------------------------------
# Cells are numbered ``row * 4 + col``; the arena is centred on the origin, x grows with col and y with
# row, so cell (row, col) spans x in [-2 + col, -1 + col] (for CELL_SIZE = 1), likewise y.
HALF = GRID * CELL_SIZE / 2   # the arena is [-HALF, HALF]^2


def cell_centre(cell: int, size: float = CELL_SIZE) -> np.ndarray:
    r, c = divmod(cell, GRID)
    return np.array([(c + 0.5) * size - GRID * size / 2, (r + 0.5) * size - GRID * size / 2])


def cell_of(xy, size: float = CELL_SIZE) -> int:
    """The cell containing point ``xy``, or -1 outside the arena."""
    col, row = int(np.floor(xy[0] / size + GRID / 2)), int(np.floor(xy[1] / size + GRID / 2))
    return row * GRID + col if (0 <= row < GRID and 0 <= col < GRID) else -1


def neighbours(cell: int, blocked: set = frozenset()) -> list:
    """(next cell, step length in cells) for the 8 neighbours of ``cell``. A diagonal step is allowed only
    when both cells beside it are free, so cutting the corner never touches a blocked cell, and never out
    of a blocked cell (the colour just visited: leaving it through a corner risks swaying back in)."""
    r, c = divmod(cell, GRID)
    out = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            if (dr or dc) and 0 <= rr < GRID and 0 <= cc < GRID:
                if dr and dc and (cell in blocked or r * GRID + cc in blocked or rr * GRID + c in blocked):
                    continue
                out.append((rr * GRID + cc, 1.4142 if dr and dc else 1.0))
    return out


def shortest_path(start: int, goal: int, blocked: set) -> list | None:
    """Cells from ``start`` to ``goal`` (both included) with the least walking distance (Dijkstra over the
    8-neighbour grid), never through a ``blocked`` cell (the wall and every colour other than the goal);
    None if there is no such path. ``start`` may itself be blocked (the colour just visited). (A diagonal
    step needs both side cells free, so the task is solvable exactly when it is on the 4-neighbour grid.)"""
    dist, prev, todo = {start: 0.0}, {start: None}, {start}
    while todo:
        cell = min(todo, key=dist.get)
        todo.remove(cell)
        if cell == goal:
            path = [cell]
            while prev[path[-1]] is not None:
                path.append(prev[path[-1]])
            return path[::-1]
        for n, step in neighbours(cell, blocked):
            if (n == goal or n not in blocked) and dist[cell] + step < dist.get(n, np.inf):
                dist[n], prev[n] = dist[cell] + step, cell
                todo.add(n)
    return None


def sample_layout(rng: np.random.Generator, task: tuple) -> tuple:
    """Colour cells, the wall cell and the start cell, uniformly without overlap; resampled until the task
    can be completed (each needed colour reachable from the previous one, or from the start, without
    crossing the wall or another colour). Returns ``(colour_cells[4], wall_cell, start_cell)``."""
    while True:
        cells = rng.permutation(N_CELLS)[:N_COLOURS + N_WALLS + 1].tolist()
        colour_cells, wall, start = cells[:N_COLOURS], cells[N_COLOURS], cells[-1]
        pos, ok = start, True
        for c in task:
            blocked = {wall} | {colour_cells[o] for o in range(N_COLOURS) if o != c}
            if shortest_path(pos, colour_cells[c], blocked) is None:
                ok = False
                break
            pos = colour_cells[c]
        if ok:
            return colour_cells, wall, start


def symlog(x):
    """sign(x) ln(1 + |x|): squashes large velocities, keeps small values ~linear [P A.2.1]."""
    return np.sign(x) * np.log1p(np.abs(x))


_XML_CACHE: dict = {}


def arena_xml(size: float = CELL_SIZE) -> str:
    """Absolute path of an Ant MJCF with the 4x4 floor tiles added (written once per process).

    The tiles are thin visual boxes (no collisions: contype = conaffinity = 0) whose colours the env
    sets at every reset. gymnasium looks a bare file name up inside its own assets, hence the absolute
    path."""
    if size in _XML_CACHE:
        return _XML_CACHE[size]
    import gymnasium.envs.mujoco as gm
    with open(os.path.join(os.path.dirname(gm.__file__), "assets", "ant.xml")) as f:
        xml = f.read()
    tiles = "".join(
        f'<geom name="tile{i}" type="box" pos="{cell_centre(i, size)[0]:.4f} {cell_centre(i, size)[1]:.4f} 0.002" '
        f'size="{size / 2 - 0.02:.4f} {size / 2 - 0.02:.4f} 0.002" contype="0" conaffinity="0" material="tile"/>'
        for i in range(N_CELLS))
    edits = (('<body name="torso"', tiles + '<body name="torso"'),           # the tiles, before the ant
             ('<material name="geom"', '<material name="tile" emission="0.25" specular="0" reflectance="0"/>'
                                       '<material name="geom"'),             # flat, saturated tile colours
             ('material="MatPlane" name="floor" pos="0 0 0" rgba="0.8 0.9 0.8 1"',   # a plain grey floor
              'name="floor" pos="0 0 0" rgba="0.45 0.45 0.45 1"'),
             ('diffuse="1 1 1" dir="-0 0 -1.3"', 'diffuse="0.6 0.6 0.6" dir="-0 0 -1.3"'))  # softer light
    for old, new in edits:
        if old not in xml:
            raise RuntimeError(f"unexpected ant.xml in this gymnasium version (no {old!r}); tested with gymnasium 1.4")
        xml = xml.replace(old, new, 1)
    path = os.path.join(tempfile.gettempdir(), f"ant_pinpad_{os.getpid()}_{size:g}.xml")
    with open(path, "w") as f:
        f.write(xml)
    _XML_CACHE[size] = path
    return path


# ---------------------------------------------------------------------------------------------------
# 3. The env
# ---------------------------------------------------------------------------------------------------
PROPRIO_DIM = 27              # torso z, quaternion (4), 8 joint angles, 14 velocities
OBS_DIM = PROPRIO_DIM + 2 + 2 * N_COLOURS + 2 * N_WALLS + 2   # 41


class AntPinpadEnv(gym.Env):
    """Ant-pinpad: walk MuJoCo's quadruped into coloured floor cells in a task-specific order [P App. A.2].

    ## Description
    gymnasium's ``Ant-v5`` quadruped (composition: an inner ``AntEnv`` does the physics and rendering) on
    a floor of 4x4 cells of ``CELL_SIZE`` = 1 m. Four cells are coloured (colours 0..3), one is a
    forbidden wall cell (drawn dark; it has no physical wall), the rest are free. A *task* is a sequence
    of colours to enter in order, e.g. ``0-3-2``; each colour is one subgoal (id = the colour). The task
    is never shown to the agent: it must be inferred in context.

    ## Action Space
    ``Box(-1, 1, (8,), float32)``: the 8 joint torques of ``Ant-v5`` (its action table: hip_4, ankle_4,
    hip_1, ankle_1, hip_2, ankle_2, hip_3, ankle_3), one env step = 5 physics steps = 0.05 s.

    ## Observation Space
    ``Box(-inf, inf, (41,), float32)``:

    | index  | meaning                                                                        |
    |--------|--------------------------------------------------------------------------------|
    | 0..26  | proprioception through symlog: torso z, torso quaternion (w,x,y,z), 8 joint    |
    |        | angles (hip_1, ankle_1, ..., hip_4, ankle_4), 6 torso velocities, 8 joint      |
    |        | velocities                                                                     |
    | 27..28 | the ant's x, y divided by the arena's half-width (in [-1, 1] inside the arena)  |
    | 29..36 | position of coloured cell 0..3's centre minus the ant's x, y, in cells         |
    | 37..38 | the same for the wall cell                                                     |
    | 39..40 | the ant's position inside its current cell, in [-1, 1] (0 = the cell's centre) |

    Nothing about the task, the current subgoal or which colours were visited is in the observation.

    ## Rewards
    1 when the last colour of the task is entered, else 0 (sparse).

    ## Starting State
    Colours, the wall and the start cell are sampled uniformly without overlap from ``self.np_random``;
    layouts where the task cannot be completed (a needed colour reachable only across the wall or
    another colour) are resampled. The torso starts in the start cell (the paper: anywhere in it [P A.2.1];
    here its centre plus uniform noise, kept 0.25 m from the edges), at height 0.75 m, with a uniformly random
    yaw; joint angles and all velocities are uniform within +-0.1 of Ant-v5's rest pose and zero.

    ## Episode End
    * Termination, success: every colour of the task entered in order (a colour counts as visited when
      the ant's centre, the torso's x, y, enters its cell from a different cell).
    * Termination, failure: the centre enters a colour other than the next one the task needs, enters
      the wall cell, or leaves the arena (our addition: the paper's arena has no outside); or the torso
      height leaves [0.2, 1.0] (the ant fell or jumped).
    * Truncation: 500 steps elapsed.

    ## Info
    ``subgoal`` (ground-truth current subgoal = the next needed colour, the last one once done; for
    probes and analysis only), ``next_colour``, ``visited`` (task colours entered so far), ``cell``
    (the ant's cell, -1 outside), ``success`` (bool), ``end`` (why the episode ended: "success",
    "wrong colour", "wall", "outside", "height", "time-out"; "" while it runs).

    ## Arguments
    ``task``: a tuple of colours, or None (then a pretraining task is sampled at every reset);
    ``reset(options={"task": ...})`` overrides it for one episode. ``render_mode``: "rgb_array" (a top
    view of the arena, ``width`` x ``height`` pixels) or None.
    Nothing is coerced: a task that is not a non-empty sequence of ints in range with no colour twice in a
    row, an invalid action, or a non-positive ``max_steps`` is a ``ValueError``; ``step()`` before ``reset()``
    or after the episode has ended is a ``RuntimeError``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: tuple | None = None, render_mode: str | None = None, max_steps: int = MAX_STEPS,
                 width: int = 480, height: int = 480):
        try:
            from gymnasium.envs.mujoco.ant_v5 import AntEnv
        except (ImportError, gym.error.DependencyNotInstalled) as e:
            raise ImportError(f"ant-pinpad needs MuJoCo: pip install 'gymnasium[mujoco]' mujoco ({e})") from e
        self.default_task = None if task is None else check_task(task, N_COLOURS)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.max_steps = check_max_steps(max_steps)
        camera = {"distance": 2.3 * GRID * CELL_SIZE, "elevation": -90.0, "azimuth": 90.0,
                  "lookat": np.zeros(3), "trackbodyid": -1}
        # The inner Ant-v5 does physics and rendering only; its reward and termination are not used.
        self.ant = AntEnv(xml_file=arena_xml(), exclude_current_positions_from_observation=False,
                          include_cfrc_ext_in_observation=False, terminate_when_unhealthy=False,
                          default_camera_config=camera, render_mode=render_mode, width=width, height=height)
        self.observation_space = spaces.Box(-np.inf, np.inf, (OBS_DIM,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (8,), dtype=np.float32)
        self._tiles = [self.ant.model.geom(f"tile{i}").id for i in range(N_CELLS)]
        self.task: tuple = PRETRAIN_TASKS[0]
        self.colour_cells, self.wall, self.cell = [0, 1, 2, 3], 4, 5
        self.progress, self.t, self.end_reason, self.ended = 0, 0, "", None   # ended: None before the first reset

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and options.get("task") is not None:
            self.task = check_task(options["task"], N_COLOURS)
        elif self.default_task is not None:
            self.task = self.default_task
        else:
            self.task = PRETRAIN_TASKS[int(self.np_random.integers(len(PRETRAIN_TASKS)))]
        self.colour_cells, self.wall, start = sample_layout(self.np_random, self.task)
        rgba = self.ant.model.geom_rgba
        for i, g in enumerate(self._tiles):
            rgba[g] = FLOOR_RGBA
        for c, cell in enumerate(self.colour_cells):
            rgba[self._tiles[cell]] = COLOUR_RGBA[c]
        rgba[self._tiles[self.wall]] = WALL_RGBA
        ant, rng = self.ant, self.np_random
        qpos = ant.init_qpos.copy()
        qpos[:2] = cell_centre(start) + rng.uniform(-1, 1, 2) * (CELL_SIZE / 2 - 0.25)
        yaw = rng.uniform(-np.pi, np.pi)
        qpos[3:7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))              # quaternion of a pure yaw
        qpos[7:] += rng.uniform(-0.1, 0.1, 8)
        qvel = rng.uniform(-0.1, 0.1, ant.model.nv)
        ant.set_state(qpos, qvel)
        self.cell, self.progress, self.t, self.end_reason, self.ended = start, 0, 0, "", False
        return self._obs(), self._info()

    def step(self, action):
        check_stepping(self.ended)
        try:
            action = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            action = None
        if action is None or action.shape != (8,) or not np.isfinite(action).all():
            raise ValueError("an action is 8 finite torques (values outside [-1, 1] are clipped)")
        action = np.clip(action, -1.0, 1.0)
        self.ant.do_simulation(action, self.ant.frame_skip)
        self.t += 1
        xy, z = self.ant.data.qpos[:2], self.ant.data.qpos[2]
        cell, reward, end = cell_of(xy), 0.0, ""
        if not HEIGHT_RANGE[0] <= z <= HEIGHT_RANGE[1]:
            end = "height"                                             # fell over (or jumped)
        elif cell < 0:
            end = "outside"
        elif cell == self.wall:
            end = "wall"
        elif cell != self.cell and cell in self.colour_cells:          # entered a coloured cell
            if self.colour_cells.index(cell) == self.task[self.progress]:
                self.progress += 1
                if self.progress == len(self.task):
                    reward, end = 1.0, "success"
            else:
                end = "wrong colour"
        self.cell = cell
        terminated = bool(end)
        truncated = self.t >= self.max_steps and not terminated
        self.end_reason = end or ("time-out" if truncated else "")
        self.ended = terminated or truncated
        return self._obs(), reward, terminated, truncated, self._info()

    @property
    def failed(self) -> bool:
        """Ended by a failure (not success, not a time-out)."""
        return self.end_reason not in ("", "success", "time-out")

    @property
    def success(self) -> bool:
        return self.progress == len(self.task)

    @property
    def colour_here(self) -> int:
        """The colour of the ant's cell, -1 for none (analysis: which colour a failed episode entered)."""
        return self.colour_cells.index(self.cell) if self.cell in self.colour_cells else -1

    @property
    def subgoal(self) -> int:
        """Ground-truth current subgoal: the next needed colour (the last one once done)."""
        return self.task[min(self.progress, len(self.task) - 1)]

    def _obs(self) -> np.ndarray:
        qpos, qvel = self.ant.data.qpos, self.ant.data.qvel
        xy = qpos[:2]
        rel = [(cell_centre(c) - xy) / CELL_SIZE for c in self.colour_cells + [self.wall]]
        inside = (xy - cell_centre(cell_of(np.clip(xy, -HALF + 1e-6, HALF - 1e-6)))) / (CELL_SIZE / 2)  # nearest cell outside
        return np.concatenate([symlog(np.concatenate([qpos[2:], qvel])), xy / HALF, *rel, inside]).astype(np.float32)

    def _info(self) -> dict:
        nxt = self.task[self.progress] if self.progress < len(self.task) else -1
        return {"subgoal": self.subgoal, "next_colour": nxt, "visited": self.progress, "cell": self.cell,
                "success": self.success, "end": self.end_reason}

    def render(self):
        return self.ant.render() if self.render_mode == "rgb_array" else None

    def close(self):
        self.ant.close()


# ---------------------------------------------------------------------------------------------------
# 4. The expert: an omnidirectional trot with heading feedback, driven by a planner over cells
# ---------------------------------------------------------------------------------------------------
# The paper's ant expert is a PPO agent [P C.1.1]; this one is hand-designed: it needs no training
# and fits in a screenful. It has two levels, which is also a
# picture of the abstraction the paper wants the base model to discover:
#
#   planner: a shortest path over cells (8 neighbours, Dijkstra) from the ant's cell to the next needed
#     colour, avoiding the wall and every other colour; the ant walks from cell centre to cell centre
#     along it (class Expert below says why).
#   gait (every step): a trot. Diagonal leg pairs (1, 3) and (2, 4) alternate at FREQ Hz; the pair in
#     stance sweeps its hips so that the feet push opposite to the desired direction d, the other pair
#     lifts (ankles bend less) and swings back. Leg i sits at angle theta_i on the torso and its hip turns
#     it about the vertical axis, so its foot moves along the tangent t_i = (-sin theta_i, cos theta_i);
#     the sweep amplitude of leg i is therefore proportional to -d . t_i, with d in the torso's frame
#     (heading feedback: d is rotated by the torso's yaw at every step, so the ant walks in any direction
#     without turning). Joint targets are tracked by a PD law clipped to the torque range.
#
# On flat ground it walks at about 0.5 m/s in every direction. ``noise`` adds Gaussian noise to the
# action (dataset D). Keep it small: on pretraining tasks the expert succeeds in 0.84 of episodes noise-free,
# 0.80 at std 0.03 per step and 0.35 at 0.1 (``python ant_tasks.py --noise 0.1``). D* uses the noise-free
# action, the analogue of the paper's "mean action" [P C.4.4].
LEG_ANGLE = np.deg2rad([45.0, 135.0, 225.0, 315.0])    # legs 1..4 (front left, front right, back, right back)
ANKLE_SIGN = np.array([1.0, -1.0, -1.0, 1.0])          # ankle_1, ankle_4 bend positive; ankle_2, ankle_3 negative
GAIT = dict(freq=1.0, sweep=0.5, down=1.0, lift=0.3, kp=3.0, kd=0.1)


def torso_yaw(qpos) -> float:
    w, x, y, z = qpos[3:7]
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def gait_action(t: int, qpos, qvel, direction, dt: float = 0.05, g: dict = GAIT) -> np.ndarray:
    """Torques (8,) in Ant-v5's actuator order that trot towards the world-frame unit vector ``direction``."""
    yaw = torso_yaw(qpos)
    c, s = np.cos(yaw), np.sin(yaw)
    d = np.array([c * direction[0] + s * direction[1], -s * direction[0] + c * direction[1]])  # world -> torso
    tangent = np.stack([-np.sin(LEG_ANGLE), np.cos(LEG_ANGLE)], 1)                  # (4, 2)
    phase = 2 * np.pi * g["freq"] * t * dt + np.array([0.0, np.pi, 0.0, np.pi])     # pairs (1,3) and (2,4)
    hip = g["sweep"] * -(tangent @ d) * np.cos(phase)                               # (4,) hip targets
    ankle = ANKLE_SIGN * (g["down"] - g["lift"] * np.clip(np.sin(phase), 0, None))  # (4,) lift in swing
    target = np.stack([hip, ankle], 1).reshape(-1)          # joint order hip_1, ankle_1, ..., hip_4, ankle_4
    torque = np.clip(g["kp"] * (target - qpos[7:]) - g["kd"] * qvel[6:], -1.0, 1.0)
    return np.concatenate([torque[6:8], torque[0:6]])       # -> actuator order hip_4, ankle_4, hip_1, ...


class Expert:
    """The expert, one episode at a time: a waypoint planner over cells plus the trot above.

    The planner walks from cell centre to cell centre along a shortest path (diagonal steps only
    between two free cells) to the next needed colour, avoiding the wall and every other colour. It
    moves on to the next waypoint only once within ``arrive`` metres of the current one, so the ant
    crosses cell edges near their middle and never dithers along the edge of a forbidden cell; after
    entering a colour it first walks on to that cell's centre (re-entering the colour just visited would
    end the episode)."""

    def __init__(self, noise: float = 0.0, rng: np.random.Generator | None = None, arrive: float = 0.35):
        self.noise, self.rng, self.arrive = noise, rng, arrive
        self.waypoint = None

    def __call__(self, env: AntPinpadEnv) -> np.ndarray:
        """One action (8,) for the env's current state (privileged: uses the layout and the task)."""
        qpos, qvel = env.ant.data.qpos, env.ant.data.qvel
        xy = qpos[:2]
        if env.t == 0:
            self.waypoint = None                                         # a new episode
        if self.waypoint is None or np.linalg.norm(cell_centre(self.waypoint) - xy) < self.arrive:
            goal = env.colour_cells[env.subgoal]
            blocked = {env.wall} | {cell for cell in env.colour_cells if cell != goal}
            here = cell_of(xy)
            path = shortest_path(here, goal, blocked) if here >= 0 else None
            self.waypoint = path[1] if path and len(path) > 1 else goal
        delta = cell_centre(self.waypoint) - xy
        a = gait_action(env.t, qpos, qvel, delta / (np.linalg.norm(delta) + 1e-8), env.ant.dt)
        if self.rng is not None and self.noise > 0:
            a = np.clip(a + self.noise * self.rng.standard_normal(8), -1.0, 1.0)
        return a.astype(np.float32)


def expert_episode(env: AntPinpadEnv, rng: np.random.Generator, task: tuple, noise: float = 0.0, seed=None) -> dict:
    """Roll out the expert for one episode. Returns ``obs`` (T+1, 41), ``actions`` (T, 8), ``subgoals``
    (T,) the ground-truth subgoal at each step, ``success`` and ``end`` (why it ended)."""
    obs, info = env.reset(seed=int(rng.integers(2 ** 31)) if seed is None else seed, options={"task": task})
    seen, acts, subgoals, expert = [obs], [], [], Expert(noise, rng)
    while True:
        a = expert(env)
        subgoals.append(info["subgoal"])
        obs, _, term, trunc, info = env.step(a)
        seen.append(obs)
        acts.append(a)
        if term or trunc:
            break
    return {"obs": np.array(seen), "actions": np.array(acts), "subgoals": np.array(subgoals),
            "success": bool(info["success"]), "end": env.end_reason}


def evaluate_expert(n: int, seed: int = 0, noise: float = 0.0, log=print) -> dict:
    """Expert success over ``n`` episodes of the pretraining tasks (each equally often) and ``n`` of the
    post-training task, with the failure causes. Env seeds come from ``seed``."""
    env, rng, out = AntPinpadEnv(), np.random.default_rng(seed), {}
    for name, tasks in (("pretrain", PRETRAIN_TASKS), ("posttrain", (POSTTRAIN_TASK,))):
        wins, why = 0, {}
        for i in range(n):
            ep = expert_episode(env, rng, tasks[i % len(tasks)], noise)
            wins += ep["success"]
            if not ep["success"]:
                cause = ep["end"]
                why[cause] = why.get(cause, 0) + 1
        out[name] = {"success": wins / n, "failures": why}
        log(f"expert on {'pretraining tasks' if name == 'pretrain' else 'the post-training task'}: success "
            f"{wins / n:.3f} over {n} episodes, failures {why}")
    return out


DATA_CHUNK = 20               # episodes per seeded chunk of work (internal_rl.py's stored datasets)


def expert_chunk(job: tuple) -> tuple:
    """One chunk of work, run in a worker process: ``n`` successful expert episodes from one seed (the task
    uniform per episode) and how many attempts that took. With ``post``: n attempts on the post-training
    task, none kept, and how many succeeded. Returns (episodes, attempts, successes)."""
    seed, n, noise, post = job
    env, rng, out = AntPinpadEnv(), np.random.default_rng(seed), []
    if post:
        return [], n, sum(expert_episode(env, rng, POSTTRAIN_TASK)["success"] for _ in range(n))
    for tries in range(1, 20 * n + 1):
        ep = expert_episode(env, rng, PRETRAIN_TASKS[int(rng.integers(len(PRETRAIN_TASKS)))], noise)
        if ep["success"]:                            # D holds successful trajectories [P C.1.1]
            out.append({"obs": ep["obs"].astype(np.float32), "actions": ep["actions"].astype(np.float32),
                        "subgoals": ep["subgoals"].astype(np.int64)})
            if len(out) == n:
                return out, tries, n
    raise RuntimeError(f"the ant expert succeeded in only {len(out)} of {20 * n} episodes with --action-noise "
                       f"{noise}; use a smaller --action-noise (success ~0.84 noise-free, ~0.80 at 0.03, ~0.35 at 0.1)")


def generate_dataset(sets: dict, workers: int, log=print) -> tuple:
    """Stored expert datasets, generated by ``workers`` processes.

    ``sets``: name -> (n, noise, seed_sequence, post), see expert_chunk. Each set is cut into chunks of
    DATA_CHUNK episodes, each seeded by its own child of the set's ``numpy.random.SeedSequence``, so the
    episodes do not depend on ``workers``. Returns ({name: episodes}, {name: successes}, {name: attempts})."""
    jobs, t0 = [], time.time()
    for name, (n, noise, ss, post) in sets.items():
        for j, child in enumerate(ss.spawn(-(-n // DATA_CHUNK))):
            jobs.append((name, (int(child.generate_state(1)[0]), min(DATA_CHUNK, n - DATA_CHUNK * j), noise, post)))
    eps, wins, tries = {name: [] for name in sets}, dict.fromkeys(sets, 0), dict.fromkeys(sets, 0)
    # Workers ignore Ctrl-C: the main process alone stops (one line, no traceback per worker) and ends the pool.
    with multiprocessing.get_context("fork").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        for i, (out, n_try, n_win) in enumerate(pool.imap(expert_chunk, [job for _, job in jobs])):
            name = jobs[i][0]
            eps[name], tries[name], wins[name] = eps[name] + out, tries[name] + n_try, wins[name] + n_win
            if (i + 1) % max(1, len(jobs) // 10) == 0 or i + 1 == len(jobs):
                el = time.time() - t0
                log(f"ant expert episodes: chunk {i + 1}/{len(jobs)} | {el:.0f}s elapsed, "
                    f"eta {el / (i + 1) * (len(jobs) - i - 1):.0f}s")
    return eps, wins, tries


def expert_datasets(ss: list, n_train: int, n_heldout: int, n_dstar: int, n_post: int, noise: float, workers: int,
                    log=print) -> tuple:
    """The stored sets of ``internal_rl.py`` and the expert's success rates. ``ss``: six SeedSequences (0-3 the
    sets, 5 the post-training attempts; 4 is the caller's). D (train, heldout) has action noise ``noise``, D*
    (dstar_train, dstar_heldout) none. Returns ({name: {obs, actions, subgoals: each field concatenated over the
    episodes, lengths (n,)}}, {"pretrain": success in the D* attempts, "posttrain": in ``n_post`` episodes})."""
    spec = {"train": (n_train, noise, ss[0], False), "heldout": (n_heldout, noise, ss[1], False),
            "dstar_train": (n_dstar, 0.0, ss[2], False), "dstar_heldout": (n_dstar, 0.0, ss[3], False),
            "expert_post": (n_post, 0.0, ss[5], True)}                     # attempts only: a success rate
    sets, wins, tries = generate_dataset(spec, workers, log)
    star = ("dstar_train", "dstar_heldout")
    expert = {"pretrain": sum(wins[k] for k in star) / sum(tries[k] for k in star),
              "posttrain": wins["expert_post"] / tries["expert_post"]}
    del sets["expert_post"]
    return {name: {**{k: np.concatenate([ep[k] for ep in eps]) for k in ("obs", "actions", "subgoals")},
                   "lengths": np.array([len(ep["actions"]) for ep in eps], dtype=np.int64)}
            for name, eps in sets.items()}, expert


def split_episodes(d: dict) -> list:
    """The inverse of expert_datasets' concatenation: one set -> a list of episodes (views, no copies)."""
    n = d["lengths"].tolist()
    cut = lambda x, k: np.split(x, np.cumsum([m + k for m in n])[:-1])         # k = 1: obs has T+1 rows
    return [{"obs": o, "actions": a, "subgoals": g} for o, a, g in zip(cut(d["obs"], 1), cut(d["actions"], 0),
                                                                        cut(d["subgoals"], 0))]


# ---------------------------------------------------------------------------------------------------
# 5. Registration, and a command line for the expert
# ---------------------------------------------------------------------------------------------------
if "AntPinpad-v0" not in gym.registry:
    gym.register(id="AntPinpad-v0", entry_point="ant_tasks:AntPinpadEnv")

if __name__ == "__main__":
    import argparse
    import sys
    p = argparse.ArgumentParser(description="Evaluate the ant-pinpad expert (and save a picture of the arena).")
    p.add_argument("--episodes", type=int, default=200, help="episodes per task family (0: only the picture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.0, help="action noise std (dataset D uses a little)")
    p.add_argument("--picture", default="", help="also save a top view of one arena to this PNG path")
    a = p.parse_args()

    def writable(folder: str) -> bool:
        try:
            with tempfile.TemporaryFile(dir=folder):
                return True
        except OSError:
            return False
    folder = os.path.dirname(os.path.abspath(a.picture))
    problem = ("--episodes must be non-negative" if a.episodes < 0 else
               "--seed must be non-negative" if a.seed < 0 else
               f"--noise must be a finite non-negative number, got {a.noise}" if not 0 <= a.noise < float("inf") else
               f"--picture must name a .png file, got {a.picture!r}" if a.picture and not a.picture.lower().endswith(".png")
               else f"--picture: cannot write into {folder}" if a.picture and not writable(folder) else "")
    if problem:
        sys.exit(f"ant_tasks.py: error: {problem}")
    if a.episodes > 0:
        t0 = time.time()
        evaluate_expert(a.episodes, a.seed, a.noise)
        print(f"{time.time() - t0:.0f}s")
    if a.picture:
        import matplotlib.pyplot as plt
        try:
            env = AntPinpadEnv(render_mode="rgb_array")
            env.reset(seed=a.seed)
            plt.imsave(a.picture, env.render())
        except Exception as e:  # noqa: BLE001 -- MuJoCo without an OpenGL backend, or a failed write
            sys.exit(f"ant_tasks.py: error: cannot save {a.picture} ({type(e).__name__}: {str(e)[:100]}); try "
                     f"MUJOCO_GL=osmesa (egl is the default without a display)")
