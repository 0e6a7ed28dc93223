"""Verifier-guided search over reasoning steps: best-of-n and RMaxTS (DeepSeek-Prover-V1.5, sec. 3).

Both methods spend a budget of samples (full completions from a policy) per problem, and a problem is solved when
one completion's answer passes the task's exact checker (tasks.accuracy_reward): the verifier plays the part Lean
plays in Prover. pass@budget is the fraction of problems solved within `budget` samples.

best-of-n  n independent completions from the prompt.

RMaxTS     Monte-Carlo tree search whose nodes are reasoning steps, the lines of the <think> block
           (tasks.think_steps); a node stands for the assistant prefix "<think>\\n" + the steps on its path, the
           root for the bare prompt. One iteration:

  select   walk down from the root; at each node choose, among its children and a virtual child "expand here",
           the edge with the largest discounted UCB (below); stop at "expand here" or at a node without children.
           An edge never taken comes first, children before "expand here", so the first walk that reaches a
           fresh chain resumes after its last valid step.
  expand   sample one completion from the node's prefix (one sample of the budget), check its steps, and keep
           them up to the first one the step checker rejects (tasks.first_bad_step): truncate-and-resume. The
           kept steps below the node are added to the tree as a chain; steps already there are shared.
  reward   extrinsic 1 if the completion's answer verifies, plus the RMax intrinsic reward 1 if the chain reached
           something new (Prover sec. 3.2: optimism about the unexplored, so that the search explores while no
           proof has been found, when the extrinsic reward is always 0). New means, with novelty="state" (the
           default), a task state never reached before in this tree (tasks.step_state: countdown's numbers
           left, arithmetic's equations), as Prover's nodes are tactic states; with novelty="node", any new
           line of text, so a reworded free-text line counts too.
  backup   along the selection path, ending with the edge the walk stopped at: at each node on it, the
           statistics of all its edges are discounted by gamma, then the chosen edge adds (reward, 1). This is
           discounted UCB (Garivier & Moulines 2011), which Prover uses because the intrinsic reward is not
           stationary: a region pays while it yields new steps and stops paying once it is explored.

  UCB(e) = W_gamma(e) / N_gamma(e) + c * sqrt(2 ln(sum of N_gamma over e and its siblings) / N_gamma(e))

Batching: each round selects up to `batch` expansions per tree, with a virtual loss (a pending visit with reward
0 on every edge of a path already selected in the round, Chaslot et al. 2008) so that they spread out; the
expansions of every tree in the search go to the policy in one call (one engine run). A selection depends only
on the results of earlier rounds and the selections before it in its round, so the search is anytime: its
first b samples are the same whatever the total budget, and one run at budget B gives the whole pass@b curve.

The policy is any callable from a list of Query (problem, prefix text, seed) to the continuation texts, so tests
script one; EnginePolicy is the model. Sample j of problem i draws with seed seed_of(seed, "search", i, j) in
both methods, so best-of-n and RMaxTS share their first round of samples (common random numbers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import posttrain as pt
from . import tasks

METHODS = ("rmaxts", "best-of-n")
NOVELTY = ("state", "node")  # what earns RMaxTS's intrinsic reward: a new task state, or any new line


@dataclass(frozen=True)
class Query:
    problem: tasks.Problem
    prefix: str  # assistant text already written: "" at the root, else "<think>\n" + one step per line
    seed: int


Policy = Callable[[list[Query]], list[str]]  # continuations of the queries' prefixes, in order


def require_step_checker(task_name: str) -> None:
    """RMaxTS resumes from valid steps, so it needs a task with a step checker (tasks.first_bad_step)."""
    if task_name not in tasks.STEP_TASKS:
        raise ValueError(f"task {task_name!r} has no step checker, which RMaxTS needs to truncate at the first bad "
                         f"step; use one of {sorted(tasks.STEP_TASKS)}, or --method best-of-n")


def is_solved(problem: tasks.Problem, text: str) -> bool:
    """The verifier: the completion's last answer block passes the task's exact checker."""
    return tasks.accuracy_reward(problem, text) == 1.0


def checked_steps(problem: tasks.Problem, text: str) -> tuple[list[str], int | None]:
    """(the complete reasoning steps of a completion, index of the first bad one or None). No <think>: no steps.
    An unclosed <think> block whose text does not end with a newline loses its last line, which may be cut off."""
    start = text.find("<think>")
    if start < 0:
        return [], None
    steps = tasks.think_steps(text)
    if steps and "</think>" not in text[start:] and not text.endswith("\n"):
        steps = steps[:-1]
    return steps, tasks.first_bad_step(problem, steps)


def step_prefix(steps: list[str]) -> str:
    """The assistant text a node stands for, in the worked solutions' layout (tasks.format_completion)."""
    return "<think>\n" + "".join(s + "\n" for s in steps) if steps else ""


# ------------------------------------------------------------------------------------------------ the tree
@dataclass
class Edge:
    """Statistics of one edge of the tree: into a node from its parent, or a node's virtual "expand here"."""

    w: float = 0.0  # W_gamma: discounted sum of rewards
    n: float = 0.0  # N_gamma: discounted count of visits
    visits: int = 0  # undiscounted count, for inspection
    pending: int = 0  # virtual loss: selected in the current round, not yet backed up

    def ucb(self, total: float, c: float) -> float:
        n = self.n + self.pending
        if n <= 0:
            return math.inf
        return self.w / n + c * math.sqrt(2 * math.log(max(total, 1.0)) / n)


@dataclass
class Node:
    id: int
    parent: int | None
    step: str  # the line of reasoning this node adds ("" at the root)
    depth: int  # steps on the path, this one included
    children: dict[str, int] = field(default_factory=dict)  # step text -> node id, in order of discovery
    edge: Edge = field(default_factory=Edge)  # parent -> this node
    here: Edge = field(default_factory=Edge)  # the virtual child: sample a completion from this node's prefix
    expansions: int = 0  # samples drawn from this node's prefix
    solved: bool = False  # on the path of a verified completion


class Tree:
    """The RMaxTS tree of one problem (see the module docstring); select() then expand() is one iteration."""

    def __init__(self, problem: tasks.Problem, *, c: float = 1.0, gamma: float = 0.99, novelty: str = "state"):
        if c < 0 or not 0 < gamma <= 1:
            raise ValueError(f"need c >= 0 and 0 < gamma <= 1, got c={c}, gamma={gamma}")
        if novelty not in NOVELTY:
            raise ValueError(f"novelty must be one of {list(NOVELTY)}, got {novelty!r}")
        self.problem, self.c, self.gamma, self.novelty = problem, c, gamma, novelty
        self.nodes = [Node(0, None, "", 0)]
        self.states = {tasks.step_state(problem, [])}  # reached so far (novelty="state")
        self.log: list[dict] = []  # one record per expansion, in order

    def steps(self, node_id: int) -> list[str]:
        out = []
        while node_id:
            out.append(self.nodes[node_id].step)
            node_id = self.nodes[node_id].parent
        return out[::-1]

    def prefix(self, node_id: int) -> str:
        return step_prefix(self.steps(node_id))

    def _edges(self, node: Node) -> list[Edge]:
        return [self.nodes[k].edge for k in node.children.values()] + [node.here]

    def select(self) -> tuple[int, list[tuple[int, Edge]]]:
        """Walk from the root by discounted UCB to the node to expand; returns it and the walk as (node, edge
        taken) pairs, the last edge being its "expand here", each marked pending until expand() backs it up."""
        node, path = self.nodes[0], []
        while True:
            options = [(self.nodes[k].edge, self.nodes[k]) for k in node.children.values()] + [(node.here, None)]
            total = sum(e.n + e.pending for e, _ in options)
            edge, child = max(options, key=lambda o: o[0].ucb(total, self.c))  # max keeps the first of ties
            edge.pending += 1
            path.append((node.id, edge))
            if child is None:
                return node.id, path
            node = child

    def expand(self, node_id: int, path: list[tuple[int, Edge]], continuation: str, **record) -> dict:
        """Add the valid steps of prefix(node_id) + continuation below the node, reward, back up along `path`."""
        text = self.prefix(node_id) + continuation
        steps, bad = checked_steps(self.problem, text)
        valid = steps if bad is None else steps[:bad]
        depth = self.nodes[node_id].depth
        if valid[:depth] != self.steps(node_id):  # the prefix is the node's own text, so this cannot happen
            raise RuntimeError(f"completion does not start with its node's steps: {text[:200]!r}")
        solved = is_solved(self.problem, text)
        self.nodes[node_id].expansions += 1
        node, new, new_states = self.nodes[node_id], 0, 0
        for k, step in enumerate(valid[depth:], start=depth + 1):  # truncate-and-resume: stop before a bad step
            state = tasks.step_state(self.problem, valid[:k])
            if state not in self.states:
                self.states.add(state)
                new_states += 1
            if step not in node.children:
                child = Node(len(self.nodes), node.id, step, node.depth + 1)
                self.nodes.append(child)
                node.children[step] = child.id
                new += 1
            node = self.nodes[node.children[step]]
        if solved:
            k = node.id
            while k is not None:
                self.nodes[k].solved = True
                k = self.nodes[k].parent
        novel = new_states if self.novelty == "state" else new
        reward = float(solved) + float(novel > 0)  # extrinsic + RMax intrinsic
        self.backup(path, reward)
        out = {**record, "node": node_id, "new_nodes": new, "new_states": new_states, "bad_step": bad,
               "solved": solved, "reward": reward, "text": text}
        self.log.append(out)
        return out

    def backup(self, path: list[tuple[int, Edge]], reward: float) -> None:
        """Discounted update at every node of the path: all its edges decay by gamma, then the one taken adds
        (reward, 1) and loses its pending visit."""
        for node_id, edge in path:
            for e in self._edges(self.nodes[node_id]):
                e.w *= self.gamma
                e.n *= self.gamma
            edge.w += reward
            edge.n += 1
            edge.visits += 1
            edge.pending -= 1

    def to_json(self) -> dict:
        """The tree for inspection: every node with its step, statistics and children, and every expansion."""
        def stats(e: Edge) -> dict:
            return {"visits": e.visits, "n_gamma": e.n, "w_gamma": e.w, "value": e.w / e.n if e.n else None}

        nodes = [{"id": n.id, "parent": n.parent, "step": n.step, "depth": n.depth,
                  "children": list(n.children.values()), **stats(n.edge), "expand_here": stats(n.here),
                  "expansions": n.expansions, "solved": n.solved} for n in self.nodes]
        return {"problem": {"prompt": self.problem.prompt, "answer": self.problem.answer,
                            "numbers": list(self.problem.numbers), "target": self.problem.target},
                "c": self.c, "gamma": self.gamma, "novelty": self.novelty, "states": len(self.states), "nodes": nodes,
                "expansions": self.log}


# ------------------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    problem: tasks.Problem
    method: str
    samples: int = 0  # completions drawn
    first_solved: int | None = None  # 1-based index of the first verified sample
    solutions: list[str] = field(default_factory=list)  # distinct verified completions, in the order found
    tree: Tree | None = None  # RMaxTS only


def search(problems: list[tasks.Problem], policy: Policy, budget: int, *, method: str = "rmaxts", seed: int = 0,
           batch: int = 4, c: float = 1.0, gamma: float = 0.99, max_solutions: int = 1,
           novelty: str = "state") -> list[SearchResult]:
    """Search every problem with `budget` samples, in rounds of up to `batch` samples per problem and one policy
    call per round; a problem stops when it has `max_solutions` distinct verified completions."""
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {list(METHODS)}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1 (samples per problem), got {budget!r}")
    if batch < 1 or max_solutions < 1:
        raise ValueError(f"batch and max_solutions must be >= 1, got {batch} and {max_solutions}")
    if method == "rmaxts":
        for task_name in {p.task for p in problems}:
            require_step_checker(task_name)
    results = [SearchResult(p, method, tree=Tree(p, c=c, gamma=gamma, novelty=novelty) if method == "rmaxts"
                            else None) for p in problems]
    while True:
        queries, owners = [], []
        for i, r in enumerate(results):
            for _ in range(min(batch, budget - r.samples) if len(r.solutions) < max_solutions else 0):
                node, path = r.tree.select() if r.tree else (0, [])
                queries.append(Query(r.problem, r.tree.prefix(node) if r.tree else "",
                                     pt.seed_of(seed, "search", i, r.samples)))
                owners.append((r, r.samples, node, path))
                r.samples += 1
        if not queries:
            return results
        for (r, j, node, path), q, continuation in zip(owners, queries, policy(queries)):
            if r.tree:
                solved = r.tree.expand(node, path, continuation, sample=j + 1, seed=q.seed)["solved"]
            else:
                solved = is_solved(r.problem, q.prefix + continuation)
            if solved:
                r.first_solved = r.first_solved or j + 1
                if q.prefix + continuation not in r.solutions:
                    r.solutions.append(q.prefix + continuation)


class EnginePolicy:
    """The model as a search policy: each query's chat prompt + its prefix, continued with posttrain.generate at
    `temperature` with the query's seed. The prefix counts against max_new_tokens, so a resumed completion is no
    longer than a fresh one; a prefix that already fills it gets an empty continuation. Up to `max_batch` rows
    decode together (256 rows: 1.25x the tokens/s of 64 for the 20M speedrun model on 2 cores)."""

    def __init__(self, model, tok, *, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 system_prompt: str = tasks.DEFAULT_SYSTEM, max_batch: int = 256):
        self.model, self.tok, self.max_new_tokens, self.max_batch = model, tok, max_new_tokens, max_batch
        self.temperature, self.top_p, self.system_prompt = temperature, top_p, system_prompt
        self.tokens = 0  # generated so far, for cost accounting

    def __call__(self, queries: list[Query]) -> list[str]:
        prompts, limits = [], []
        for q in queries:
            prefix_ids = self.tok.encode(q.prefix) if q.prefix else []
            prompts.append(pt.prompt_ids(self.tok, q.problem, self.system_prompt) + prefix_ids)
            limits.append(self.max_new_tokens - len(prefix_ids))
        run = [i for i, m in enumerate(limits) if m >= 1]
        out = [""] * len(queries)
        if run:
            completions = pt.generate(self.model, self.tok, [prompts[i] for i in run],
                                      max_new_tokens=[limits[i] for i in run], temperature=self.temperature,
                                      top_p=self.top_p, seeds=[queries[i].seed for i in run],
                                      max_batch=self.max_batch)
            for i, c in zip(run, completions):
                out[i] = c.text
                self.tokens += len(c.ids)
        return out


# ------------------------------------------------------------------------------------------------ reporting
def budgets_upto(budget: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b <= budget} | {budget})


def pass_at_budget(results: list[SearchResult], budgets: list[int]) -> dict:
    """{b: (solved within b samples, n, rate, Wilson 95% interval)} for each budget b."""
    out = {}
    for b in budgets:
        k = sum(r.first_solved is not None and r.first_solved <= b for r in results)
        out[b] = {"solved": k, "n": len(results), "rate": k / len(results),
                  "ci95": list(tasks.wilson_interval(k, len(results)))}
    return out


def summarize(results: list[SearchResult], budget: int) -> dict:
    curve = pass_at_budget(results, budgets_upto(budget))
    final = curve[budget]
    return {"method": results[0].method, "budget": budget, "n": len(results), "accuracy": final["rate"],
            "accuracy_ci95": final["ci95"], "pass_at_budget": {str(b): v["rate"] for b, v in curve.items()},
            "pass_at_budget_ci95": {str(b): v["ci95"] for b, v in curve.items()},
            "samples_mean": sum(r.samples for r in results) / len(results),
            "first_solved": [r.first_solved for r in results],
            "tree_nodes_mean": (sum(len(r.tree.nodes) for r in results) / len(results)
                                if results[0].tree else None)}


def sft_rows(results: list[SearchResult], system_prompt: str = tasks.DEFAULT_SYSTEM) -> list[dict]:
    """The verified solutions as SFT chat rows, in rejection sampling's format (posttrain.sft_row): exact format,
    correct answer (posttrain.keep_verified) and, where the task has a step checker, no bad step; each
    (problem, text) once. This is expert iteration's training data (Prover sec. 2.3 / 3)."""
    rows, seen = [], set()
    for r in results:
        for text in pt.keep_verified(r.problem, r.solutions):
            if r.problem.task in tasks.STEP_TASKS and checked_steps(r.problem, text)[1] is not None:
                continue
            if (r.problem.key, text) not in seen:
                seen.add((r.problem.key, text))
                rows.append(pt.sft_row(r.problem, text, system_prompt))
    return rows


def evaluate_search(model, tok, task: tasks.Task, n: int, *, method: str, budget: int, seed: int = 0,
                    batch: int = 4, c: float = 1.0, gamma: float = 0.99, max_new_tokens: int = 256,
                    temperature: float = 1.0, top_p: float = 1.0, examples: int = 0,
                    novelty: str = "state", system_prompt: str = tasks.DEFAULT_SYSTEM) -> tuple[dict, list]:
    """pass@budget of `method` on the n problems `nanoseek eval` uses with this seed (posttrain.eval_problems):
    (summary dict, the SearchResults)."""
    policy = EnginePolicy(model, tok, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          system_prompt=system_prompt)
    t0 = time.perf_counter()
    results = search(pt.eval_problems(task, n, seed), policy, budget, method=method, seed=seed, batch=batch,
                     c=c, gamma=gamma, novelty=novelty)
    out = {**summarize(results, budget), "decode": f"sampled T={temperature} top_p={top_p}",
           "tokens": policy.tokens, "seconds": time.perf_counter() - t0}
    if examples:
        out["examples"] = [{"prompt": r.problem.prompt, "answer": r.problem.answer, "samples": r.samples,
                            "solution": r.solutions[0] if r.solutions else None} for r in results[:examples]]
    return out, results
