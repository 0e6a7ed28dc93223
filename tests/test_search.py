"""Verifier-guided search: discounted UCB, the RMax intrinsic reward, truncate-and-resume and batching on scripted
toy policies (exact, deterministic), the SFT rows of expert iteration, bad input, and one end-to-end run of the
engine-backed policy and the CLI on a random tiny model."""

import json
import math
import random

import pytest
import torch

from nanoseek import posttrain as pt
from nanoseek import search, tasks
from nanoseek.search import Edge, Query, Tree

# 3 * 5 + 7 = 22: two steps; "15 + 8 = 23" is a wrong second step (8 was never given).
P = tasks.Problem("countdown", "Using the numbers [3, 5, 7], create an expression that equals 22.", "3 * 5 + 7",
                  numbers=(3, 5, 7), target=22)
HEAD = "<think>\nCombine two numbers at a time until 22 is reached.\n"
GOOD = "15 + 7 = 22\n</think>\n<answer>3 * 5 + 7</answer>"
BAD = "15 + 8 = 23\n</think>\n<answer>3 * 5 + 8</answer>"


def scripted(table):
    """A policy that continues each query with table(query), and records the prefixes and seeds of every call."""
    def policy(queries):
        policy.calls.append([q.prefix for q in queries])
        policy.seeds.append([q.seed for q in queries])
        return [table(q) for q in queries]
    policy.calls, policy.seeds = [], []
    return policy


def at_root(tree):
    """The selection path of an expansion at the root, marked pending as select() marks it."""
    tree.nodes[0].here.pending += 1
    return 0, [(0, tree.nodes[0].here)]


def resume_policy(q: Query) -> str:
    """From the prompt it always writes a valid first step and then a wrong one; given that first step, it
    finishes correctly. Best-of-n never solves; truncate-and-resume solves on its second sample."""
    if q.prefix == "":
        return HEAD + "3 * 5 = 15\n" + BAD
    return GOOD if q.prefix.endswith("3 * 5 = 15\n") else "</think>\n<answer>0</answer>"


# ----------------------------------------------------------------------------------------------------------- UCB
def test_discounted_ucb_formula_unvisited_first_and_virtual_loss():
    e = Edge(w=1.5, n=2.0)
    assert e.ucb(total=5.0, c=1.0) == pytest.approx(0.75 + math.sqrt(2 * math.log(5.0) / 2.0))
    assert e.ucb(total=5.0, c=0.0) == 0.75
    assert Edge().ucb(total=3.0, c=1.0) == math.inf  # never taken: tried first
    assert Edge(w=1.0, n=1.0).ucb(total=1.0, c=1.0) == 1.0  # ln 1 = 0: no exploration term
    e.pending = 2  # a virtual loss counts as visits with reward 0
    assert e.ucb(total=7.0, c=1.0) == pytest.approx(1.5 / 4 + math.sqrt(2 * math.log(7.0) / 4))


def test_backup_discounts_every_edge_of_each_node_on_the_path():
    tree = Tree(P, c=1.0, gamma=0.5)
    node, path = tree.select()  # empty tree: expand the root
    assert node == 0 and [e for _, e in path] == [tree.nodes[0].here]
    tree.expand(node, path, HEAD + "3 * 5 = 15\n" + BAD)  # adds 2 steps: intrinsic reward 1
    root, a = tree.nodes[0], tree.nodes[1]
    assert (root.here.w, root.here.n, root.here.visits, root.here.pending) == (1.0, 1.0, 1, 0)
    assert (a.edge.n, a.edge.visits) == (0.0, 0)  # the chain itself is not credited: it was not selected
    node, path = tree.select()  # unvisited children before "expand here": down the fresh chain
    assert node == 2 and [n for n, _ in path] == [0, 1, 2]
    tree.expand(node, path, "</think>\n<answer>0</answer>")  # nothing new, wrong: reward 0
    # At the root, "expand here" decayed once (gamma 0.5) when the chain's edge was taken.
    assert (root.here.w, root.here.n) == (0.5, 0.5)
    assert (a.edge.w, a.edge.n) == (0.0, 1.0) and tree.nodes[2].here.n == 1.0
    # Now the root's "expand here" (mean 1, fewer visits) beats the chain (mean 0): a fresh sample from the prompt.
    node, path = tree.select()
    assert node == 0 and path == [(0, root.here)]
    out = tree.expand(node, path, GOOD)  # no <think>, so no steps, but the answer verifies: extrinsic reward only
    assert (out["solved"], out["new_nodes"], out["reward"]) == (True, 0, 1.0)


def test_selection_follows_ucb_and_reports_the_chosen_node():
    tree = Tree(P, c=0.0, gamma=1.0)  # greedy on the mean: the better edge always wins
    tree.expand(*tree.select(), HEAD + "3 * 5 = 15\n" + BAD)
    tree.expand(*tree.select(), "</think>\n<answer>0</answer>")  # walks into the chain, reward 0
    assert tree.nodes[1].edge.w == 0.0 and tree.nodes[0].here.w == 1.0
    node, path = tree.select()
    assert node == 0 and path[-1][1] is tree.nodes[0].here  # root's "expand here" has mean 1 > 0


# --------------------------------------------------------------------------------------------- intrinsic reward
def test_intrinsic_reward_only_for_new_nodes_extrinsic_for_a_verified_answer():
    tree = Tree(P)
    first = tree.expand(*tree.select(), HEAD + "3 * 5 = 15\n" + BAD)
    assert (first["new_nodes"], first["solved"], first["reward"]) == (2, False, 1.0)
    again = tree.expand(*at_root(tree), HEAD + "3 * 5 = 15\n" + BAD)
    assert (again["new_nodes"], again["reward"]) == (0, 0.0)  # the same steps: nothing new, no reward
    both = tree.expand(*at_root(tree), HEAD + "3 * 5 = 15\n" + GOOD)
    assert (both["new_nodes"], both["solved"], both["reward"]) == (1, True, 2.0)
    solved = [n.step for n in tree.nodes if n.solved]
    assert solved == ["", "Combine two numbers at a time until 22 is reached.", "3 * 5 = 15", "15 + 7 = 22"]


def test_intrinsic_reward_for_new_states_not_reworded_or_reordered_lines():
    """novelty="state": a reworded free-text line and the same combination written the other way round reach no
    new state (countdown: the numbers left), so they earn nothing; novelty="node" pays for any new line."""
    reworded = "<think>\nLet us reach 22.\n3 * 5 = 15\n" + BAD
    swapped = "<think>\nCombine two numbers at a time until 22 is reached.\n5 * 3 = 15\n" + BAD
    rewards = {}
    for novelty in search.NOVELTY:
        tree = Tree(P, novelty=novelty)
        first = tree.expand(*tree.select(), HEAD + "3 * 5 = 15\n" + BAD)
        assert (first["new_nodes"], first["new_states"], first["reward"]) == (2, 1, 1.0)
        rewards[novelty] = [tree.expand(*at_root(tree), text)["reward"] for text in (reworded, swapped)]
        assert len(tree.nodes) == 6  # the tree of text keeps every new line either way, for resuming
        assert tree.to_json()["states"] == 2  # (3, 5, 7) and (7, 15)
    assert rewards == {"state": [0.0, 0.0], "node": [1.0, 1.0]}
    with pytest.raises(ValueError, match="novelty"):
        Tree(P, novelty="text")


def test_step_state_countdown_pool_and_arithmetic_equations():
    assert tasks.step_state(P, []) == (3, 5, 7)
    assert tasks.step_state(P, ["Combine them.", "3 * 5 = 15"]) == tasks.step_state(P, ["5*3 = 15"]) == (7, 15)
    assert tasks.step_state(P, ["3 * 5 = 15", "15 + 7 = 22"]) == (22,)
    add = tasks.Problem("addition", "What is 17 + 25?", "42", numbers=(17, 25), target=42)
    assert tasks.step_state(add, ["Add the ones.", "7 + 5 = 12, write 2 carry 1"]) == ("7 + 5 = 12, write 2 carry 1",)
    with pytest.raises(ValueError, match="no step checker"):
        tasks.step_state(tasks.Problem("jsonl", "q", "a"), [])


# ----------------------------------------------------------------------------------------- truncate-and-resume
def test_truncate_at_first_bad_step_and_resume_from_the_last_valid_one():
    policy = scripted(resume_policy)
    [r] = search.search([P], policy, 8, method="rmaxts", batch=1)
    assert r.first_solved == 2 and r.samples == 2 and r.solutions == [HEAD + "3 * 5 = 15\n" + GOOD]
    # The wrong step was cut: the tree holds the two valid steps, then the correct one found on resuming.
    assert [n.step for n in r.tree.nodes[1:]] == ["Combine two numbers at a time until 22 is reached.",
                                                 "3 * 5 = 15", "15 + 7 = 22"]
    assert r.tree.log[0]["bad_step"] == 2
    assert policy.calls == [[""], [HEAD + "3 * 5 = 15\n"]]  # resumed right after the last valid step
    [b] = search.search([P], scripted(resume_policy), 8, method="best-of-n", batch=1)
    assert b.first_solved is None and b.samples == 8  # the same policy from the prompt alone never gets there


def test_checked_steps_drop_a_cut_off_last_line_and_need_think():
    assert search.checked_steps(P, HEAD + "3 * 5 = 15\n15 + 7 = 2") == (
        ["Combine two numbers at a time until 22 is reached.", "3 * 5 = 15"], None)
    assert search.checked_steps(P, HEAD + "3 * 5 = 15\n15 + 7 = 22\n</think>")[1] is None
    assert search.checked_steps(P, "3 * 5 = 16\n<answer>1</answer>") == ([], None)
    assert search.checked_steps(P, HEAD + "3 * 5 = 16\n")[1] == 1
    assert search.step_prefix(["a = 1", "b"]) == "<think>\na = 1\nb\n" and search.step_prefix([]) == ""


# ---------------------------------------------------------------------------------------------- batching, runs
SECOND = {"3 * 5 = 15": "15 + 7 = 22", "5 + 7 = 12": "12 * 3 = 36", "7 - 3 = 4": "4 * 5 = 20"}


def random_policy(q: Query) -> str:
    """A seeded toy: a random first step (one of them wrong), then the step that follows it 30% of the time,
    else a random one (often wrong). Only 3 * 5 = 15, 15 + 7 = 22 reaches the target."""
    rng = random.Random(q.seed)
    text = "" if q.prefix else "<think>\nCombine two numbers at a time.\n"
    steps = search.checked_steps(P, q.prefix)[0] if q.prefix else ["Combine two numbers at a time."]
    if len(steps) < 2:
        steps.append(rng.choice(list(SECOND) + ["3 * 5 = 16"]))
        text += steps[-1] + "\n"
    follow = SECOND.get(steps[1], "1 + 1 = 3")
    step = follow if rng.random() < 0.3 else rng.choice(["15 + 7 = 21", "4 + 5 = 9", follow])
    return text + step + "\n</think>\n<answer>" + ("3 * 5 + 7" if step == "15 + 7 = 22" else "0") + "</answer>"


def test_rounds_are_batched_spread_by_virtual_loss_and_one_policy_call_each():
    policy = scripted(lambda q: "</think>\n<answer>0</answer>" if q.prefix else HEAD + "3 * 5 = 15\n" + BAD)
    problems = [P, P, P]
    results = search.search(problems, policy, 12, method="rmaxts", batch=4)
    assert [len(c) for c in policy.calls] == [12, 12, 12]  # 3 rounds; every tree's 4 expansions in one call
    assert all(r.samples == 12 and r.first_solved is None for r in results)
    # Round 1 expanded the root 4 times (one new chain: Combine..., 3 * 5 = 15). Round 2's 4 selections are
    # spread over all 3 nodes by the virtual loss; without it all 4 would resume at the end of the chain.
    assert policy.calls[0][:4] == [""] * 4
    assert sorted(policy.calls[1][:4]) == sorted(["", HEAD, HEAD + "3 * 5 = 15\n", HEAD + "3 * 5 = 15\n"])
    tree = results[0].tree
    assert all(e.pending == 0 for n in tree.nodes for e in (n.edge, n.here))


def test_search_is_reproducible_and_anytime():
    problems = [P] * 6
    long = search.search(problems, scripted(random_policy), 16, method="rmaxts", seed=3, batch=2)
    short = search.search(problems, scripted(random_policy), 8, method="rmaxts", seed=3, batch=2)
    again = search.search(problems, scripted(random_policy), 16, method="rmaxts", seed=3, batch=2)
    assert [json.dumps(r.tree.to_json()) for r in long] == [json.dumps(r.tree.to_json()) for r in again]
    for a, b in zip(long, short):  # the first 8 samples do not depend on the total budget
        assert [e["text"] for e in a.tree.log[:b.samples]] == [e["text"] for e in b.tree.log]
        assert b.first_solved is None or a.first_solved == b.first_solved
    assert 0 < sum(r.first_solved is not None for r in short) <= sum(r.first_solved is not None for r in long)
    other = search.search(problems, scripted(random_policy), 16, method="rmaxts", seed=4, batch=2)
    assert [r.tree.log[0]["text"] for r in other] != [r.tree.log[0]["text"] for r in long]
    # Best-of-n with the same seed draws the same first round from the prompt (common random numbers).
    rm, bon = scripted(random_policy), scripted(random_policy)
    search.search(problems, rm, 16, method="rmaxts", seed=3, batch=2)
    search.search(problems, bon, 16, method="best-of-n", seed=3, batch=2)
    assert rm.seeds[0] == bon.seeds[0] and rm.calls[0] == bon.calls[0] == [""] * 12

def test_tree_json_export():
    [r] = search.search([P], scripted(resume_policy), 4, method="rmaxts", batch=1)
    tree = json.loads(json.dumps(r.tree.to_json()))
    assert tree["problem"]["target"] == 22 and tree["gamma"] == 0.99
    nodes = {n["step"]: n for n in tree["nodes"]}
    assert nodes["3 * 5 = 15"]["children"] == [nodes["15 + 7 = 22"]["id"]] and nodes["15 + 7 = 22"]["solved"]
    assert nodes[""]["expand_here"]["visits"] == 1 and nodes["3 * 5 = 15"]["visits"] == 1
    assert [e["sample"] for e in tree["expansions"]] == [1, 2] and tree["expansions"][1]["solved"]


def test_pass_at_budget_and_summary():
    results = [search.SearchResult(P, "rmaxts", samples=s, first_solved=f) for s, f in ((3, 3), (8, None), (1, 1))]
    curve = search.pass_at_budget(results, [1, 2, 4, 8])
    assert [curve[b]["solved"] for b in (1, 2, 4, 8)] == [1, 1, 2, 2]
    assert curve[8]["ci95"] == list(tasks.wilson_interval(2, 3))
    s = search.summarize(results, 8)
    assert s["pass_at_budget"] == {"1": 1 / 3, "2": 1 / 3, "4": 2 / 3, "8": 2 / 3} and s["accuracy"] == 2 / 3
    assert search.budgets_upto(48) == [1, 2, 4, 8, 16, 32, 48]


def test_sft_rows_keep_only_fully_verified_solutions_in_rejection_sampling_format(tmp_path):
    wrong_step = HEAD + "3 * 5 = 16\n16 + 7 = 22\n</think>\n<answer>3 * 5 + 7</answer>"  # right answer, bad step
    bad_format = "<answer>3 * 5 + 7</answer>"
    good = HEAD + "3 * 5 = 15\n" + GOOD
    results = [search.SearchResult(P, "rmaxts", solutions=[good, wrong_step, bad_format]),
               search.SearchResult(P, "best-of-n", solutions=[good])]  # the same problem twice: one row
    rows = search.sft_rows(results)
    assert rows == [pt.sft_row(P, good)]
    pt.write_jsonl(tmp_path / "s.jsonl", rows)
    assert pt.read_chat_jsonl(tmp_path / "s.jsonl")[0][-1] == {"role": "assistant", "content": good}


def test_bad_input():
    with pytest.raises(ValueError, match="budget must be"):
        search.search([P], scripted(resume_policy), 0)
    with pytest.raises(ValueError, match="unknown search method"):
        search.search([P], scripted(resume_policy), 4, method="mcts")
    jsonl = tasks.Problem("jsonl", "q?", "a")
    with pytest.raises(ValueError, match="no step checker"):
        search.search([jsonl], scripted(resume_policy), 4, method="rmaxts")
    assert search.search([jsonl], scripted(lambda q: "<answer>a</answer>"), 4, method="best-of-n")[0].first_solved == 1
    with pytest.raises(ValueError, match="gamma"):
        Tree(P, gamma=0.0)


# ---------------------------------------------------------------------------------- engine policy and the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nanoseek import ModelConfig, Transformer
    from nanoseek.tokenizer import Tokenizer

    texts = [tasks.DEFAULT_SYSTEM] + [p.prompt + " " + tasks.solution(p) for p in
                                      tasks.make_task("countdown").sample(0, 20)]
    root = tmp_path_factory.mktemp("search_model")
    tok = Tokenizer.train(texts * 2, vocab_size=384)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    Transformer(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256)
                ).save_pretrained(root / "model")
    return root / "model"


def run_stage(name, argv):
    import importlib

    return importlib.import_module(f"nanoseek.stages.{name}").main([str(a) for a in argv])


def test_engine_policy_counts_the_prefix_against_the_token_budget(model_dir):
    torch.set_num_threads(1)
    model, tok = pt.load_init(model_dir)
    policy = search.EnginePolicy(model, tok, max_new_tokens=6)
    prefix = HEAD + "3 * 5 = 15\n"
    assert len(tok.encode(prefix)) >= 6
    root, again, full = policy([Query(P, "", 1), Query(P, "", 1), Query(P, prefix, 2)])
    assert root == again and full == ""  # seeded; a prefix that fills the budget gets nothing more
    assert 0 < policy.tokens <= 12


def test_cli_search_trees_sft_out_and_eval(model_dir, tmp_path, capsys):
    common = ["--model", model_dir, "--task", "countdown", "--n", "2", "--max-new-tokens", "12", "--threads", "1"]
    assert run_stage("search", common + ["--budget", "3", "--batch", "2", "--run-dir", tmp_path / "s",
                                         "--trees", "1"]) == 0
    out = json.loads((tmp_path / "s" / "search_countdown_rmaxts.json").read_text())
    assert out["n"] == 2 and out["budget"] == 3 and set(out["pass_at_budget"]) == {"1", "2", "3"}
    assert out["samples_mean"] <= 3 and out["tokens"] > 0
    tree = json.loads((tmp_path / "s" / "trees" / "problem_0000.json").read_text())
    assert tree["nodes"][0]["expand_here"]["visits"] >= 1
    assert run_stage("search", common + ["--budget", "2", "--method", "best-of-n", "--sft-out",
                                         tmp_path / "sol.jsonl"]) == 0
    assert (tmp_path / "sol.jsonl").exists()  # (a random model verifies nothing: no rows, still a valid file)
    capsys.readouterr()
    assert run_stage("eval", common + ["--search", "rmaxts", "--budget", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "rmaxts" and result["budget"] == 2 and "pass_at_budget" in result


def test_searched_solutions_train_with_nanoseek_sft(model_dir, tmp_path):
    """Expert iteration's second half: the rows search writes are what `nanoseek sft --data` trains on."""
    problems = tasks.make_task("countdown").sample(0, 3)
    rows = search.sft_rows([search.SearchResult(p, "rmaxts", solutions=[tasks.solution(p)]) for p in problems])
    assert len(rows) == 3
    pt.write_jsonl(tmp_path / "solutions.jsonl", rows)
    assert run_stage("sft", ["--run-dir", tmp_path / "sft", "--init", model_dir, "--data", tmp_path / "solutions.jsonl",
                             "--steps", 1, "--batch-size", 1, "--seq-len", 128, "--eval-every", 0, "--threads", 1,
                             "--no-progress"]) == 0
    assert (tmp_path / "sft" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--task", "countdown", "--budget", "0"], "--budget must be >= 1"),
    (["--task", "sudoku"], "unknown task"),
    (["--task", "countdown", "--sft-out", "x.jsonl", "--split", "eval"], "held out"),
])
def test_cli_bad_input(model_dir, capsys, argv, message):
    assert run_stage("search", ["--model", model_dir] + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_and_task_without_step_checker(tmp_path, capsys):
    assert run_stage("search", ["--model", tmp_path / "nope", "--task", "countdown"]) == 2
    assert "expected an HF model folder" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    assert run_stage("search", ["--model", tmp_path / "nope", "--task", tmp_path / "q.jsonl"]) == 2
    assert "no step checker" in capsys.readouterr().err
    assert run_stage("eval", ["--model", tmp_path / "nope", "--task", "countdown", "--search", "rmaxts",
                              "--budget", "0"]) == 2
    assert "--budget must be >= 1" in capsys.readouterr().err
