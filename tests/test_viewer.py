"""npr view: the page's data (layout, critical path, violations), bad input, and the page itself
in a real headless browser (Debian's chromium driven by playwright)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import MULTIVERSE_TRACE, NPR_TRACE, ROOT

import npr_graph as ng
from npr_graph.cli import main
from npr_graph.viewer import critical_path, layout_tree, load_views, render_page

BROKEN = (
    "<guideline>\n<plan>1: add</plan>\n<plan>2: multiply</plan>\n</guideline>\n"
    "<step>\n1: 2+3 = 5\n</step>\n<takeaway>\nonly one step ran\n</takeaway>\n\\boxed{5}"
)
WRONG = NPR_TRACE.replace("\\boxed{5}", "\\boxed{6}").replace("sum 5", "sum 6")
SECRET = "a node text with </script><script>alert(1)</script> & <b>markup</b>"


def sample_line(text: str, problem: str, sample: int, correct: bool, valid: bool) -> str:
    """A line shaped like npr eval's samples.jsonl."""
    graph = ng.parse(text, lenient=True)
    record = {
        "problem_id": problem,
        "sample": sample,
        "reference": "5",
        "answer": ng.boxed_answers(text)[-1],
        "correct": correct,
        "parsed": True,
        "reward": 1.0 if correct else -1.0,
        "metrics": {"format_valid": valid, "format_score": ng.format_score(text)},
        "graph": graph.to_dict(),
    }
    return json.dumps(record)


@pytest.fixture
def samples_file(tmp_path) -> Path:
    path = tmp_path / "samples.jsonl"
    lines = [
        sample_line(NPR_TRACE, "roots", 0, True, True),
        sample_line(WRONG, "roots", 1, False, True),
        sample_line(BROKEN, "roots", 2, True, False),
        sample_line(NPR_TRACE.replace("Both agree", SECRET), "roots", 3, True, True),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- page data ----------------------------------------------------------------------------------


def test_layout_puts_branches_side_by_side_and_nests_blocks() -> None:
    graph = ng.parse(NPR_TRACE, lenient=True)
    assert layout_tree(graph) == [
        {
            "block": 0,
            "header": [{"node": 0}, {"node": 1}, {"node": 2}, {"node": 3}],
            "branches": [[{"node": 4}], [{"node": 5}]],
            "footer": [{"node": 6}],
        },
        {"node": 7},
    ]
    nested = layout_tree(ng.parse(MULTIVERSE_TRACE, grammar="multiverse", lenient=True))
    first_path = nested[0]["branches"][0]
    assert [item.get("block") for item in first_path] == [None, 1, None], (
        "the nested block sits inside the path that holds it, between its segments"
    )

    # every node appears exactly once
    def ids(items):
        for item in items:
            if "node" in item:
                yield item["node"]
            else:
                for part in (item["header"], *item["branches"], item["footer"]):
                    yield from ids(part)

    assert sorted(ids(nested)) == list(range(20))


def test_layout_draws_text_between_a_blocks_tags_inside_it() -> None:
    """Stray text between ``</guideline>`` and the first step (a top-level node) is laid out
    in the block's header, where it stands in the text, not after the block."""
    text = (
        "Q.\n<guideline><plan>1: a</plan><plan>2: b</plan></guideline>\nNow I execute both "
        "plans.\n<step>1: x</step><step>2: y</step><takeaway>t</takeaway>\n\\boxed{1}"
    )
    graph = ng.parse(text, lenient=True)
    stray = next(n.id for n in graph.nodes if n.content.startswith("Now I execute"))
    first, block, answer = layout_tree(graph)
    assert first == {"node": 0} and answer == {"node": len(graph.nodes) - 1}
    assert block["header"][-1] == {"node": stray}
    assert [item["node"] for item in block["header"]] == sorted(range(1, stray + 1))


def test_a_graph_nested_hundreds_of_levels_deep_is_shown() -> None:
    """Blocks nested past ``VIEW_MAX_DEPTH`` are laid out flat in the deepest block drawn (the
    page's JSON nests a few levels per block: 330 levels exceeded the encoder's recursion
    limit), every node still shown once, in text order."""
    from npr_graph.viewer import VIEW_MAX_DEPTH, sample_view

    levels = 350
    opening = "<Parallel><Goal><Outline>1: a</Outline></Goal><Path>1: "
    closing = "</Path><Conclusion>c</Conclusion></Parallel>"
    text = opening * levels + "x" + closing * levels + "\\boxed{1}"
    graph = ng.parse(text, grammar="multiverse", lenient=True, max_depth=1024)
    assert len(graph.blocks) == levels

    def walk(items, depth=0):
        for item in items:
            if "node" in item:
                yield item["node"], depth
                continue
            for part in (item["header"], *item["branches"], item["footer"]):
                yield from walk(part, depth + 1)

    placed = list(walk(layout_tree(graph)))
    assert [node for node, _ in placed] == list(range(len(graph.nodes)))
    assert max(depth for _, depth in placed) == VIEW_MAX_DEPTH
    page = render_page([sample_view({}, graph, "deep")])
    assert page.count('"node"') >= len(graph.nodes)


def test_critical_path_follows_the_longest_branch() -> None:
    graph = ng.parse(NPR_TRACE, lenient=True)
    path = critical_path(graph)
    assert path == [0, 1, 2, 3, 4, 6, 7], "step 1 is the longer step"
    ends = ng.metrics(graph)["critical_path_tokens"]
    assert sum(graph.nodes[i].char_end - graph.nodes[i].char_start for i in path) == ends


def test_bad_lines_are_reported_with_line_numbers(tmp_path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"text": NPR_TRACE}) + "\n{oops\n" + json.dumps({"other": 1}) + "\n"
        + json.dumps(ng.parse(BROKEN, lenient=True).to_dict()) + "\n"
    )  # fmt: skip
    errors: list[str] = []
    views = load_views(path, errors)
    assert len(views) == 2
    assert errors[0].startswith(f"{path}:2: not JSON") and errors[1].startswith(
        f"{path}:3: no graph"
    )
    assert views[1]["format_valid"] is False and views[1]["violations"]


def test_validity_not_in_the_record_is_npr_evals_check(tmp_path) -> None:
    """Without a record's format_valid the page judged "no strict violation", so an NPR response
    with no block at all (format score -1.5, invalid in npr eval) was not listed as invalid."""
    path = tmp_path / "plain.jsonl"
    plain = ng.parse("no blocks, just \\boxed{5}", lenient=True)
    path.write_text(
        json.dumps({"text": plain.text}) + "\n" + json.dumps(plain.to_dict()) + "\n"
        + json.dumps({"text": NPR_TRACE}) + "\n"
    )  # fmt: skip
    errors: list[str] = []
    views = load_views(path, errors)
    assert errors == [] and [v["format_valid"] for v in views] == [False, False, True]
    assert ng.format_valid(plain) is False and views[0]["violations"] == []


@pytest.mark.parametrize("metrics", [["a list"], "text", {"format_valid": "yes"}])
def test_odd_record_fields_are_left_out_not_fatal(tmp_path, metrics) -> None:
    """A record's own fields are optional extras: odd ones are not shown, the graph still is."""
    record = json.loads(sample_line(BROKEN, "roots", 0, True, True))
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({**record, "metrics": metrics}) + "\n")
    errors: list[str] = []
    [view] = load_views(path, errors)
    assert errors == [] and view["nodes"] and view["format_valid"] is False, "from the graph"


def test_a_lone_surrogate_becomes_a_replacement_character(tmp_path) -> None:
    """JSON may escape half a surrogate pair (an emoji cut in two); the page cannot hold it, so
    it becomes U+FFFD, while whole pairs stay the character they encode."""
    path = tmp_path / "cut.jsonl"
    path.write_text(
        '{"text": "<step>a\\ud800b</step>"}\n{"text": "<step>ok \\ud83d\\ude00</step>"}\n'
    )
    assert main(["view", str(path), "-o", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text("utf-8")
    assert "a\ufffdb" in page and "ok \U0001f600" in page


def test_lines_are_read_as_json_writes_them(tmp_path, capsys) -> None:
    """npr eval writes samples with ensure_ascii=False, so U+2028, U+2029 and U+0085 stand raw in
    a line (str.splitlines cut such a sample into "not JSON" pieces); a byte order mark, CRLF,
    bytes that are not UTF-8 (noted) and JSON Python cannot read (reported) are handled too."""
    text = NPR_TRACE.replace("Both agree", "Both\u2028agree\u2029, \x85 so")
    good = sample_line(text, "roots", 0, True, True)
    lines = [
        json.dumps(json.loads(good), ensure_ascii=False).encode(),
        b'{"text": "caf\xe9 \\\\boxed{1}"}',
        b'{"text": "a", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"text": "a", "n": ' + b"1" * 5000 + b"}",
    ]
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    assert main(["view", str(path), "-o", str(tmp_path / "page.html")]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: bytes that are not UTF-8 (from byte 13) replaced with U+FFFD" in err
    assert f"{path}:3: not JSON (nested too deeply)" in err
    assert f"{path}:4: not JSON (Exceeds the limit" in err
    assert err.count(f"{path}:") == 3, err
    errors: list[str] = []
    views = load_views(path, errors)
    assert [v["title"] for v in views] == ["roots · sample 0", f"{path.name}:2"]
    assert "".join(n["text"] for n in views[0]["nodes"]) == text
    assert "".join(n["text"] for n in views[1]["nodes"]) == "caf\ufffd \\boxed{1}"


def embedded_data(page: str) -> dict:
    """The page's data as JSON.parse reads it: NaN, Infinity and -Infinity are not JSON."""
    data = re.search(r'<script id="npr-data" type="application/json">(.*?)</script>', page, re.S)

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(data.group(1), parse_constant=refuse)


@pytest.mark.parametrize(
    "answer, reference, shown",
    [
        ("NaN", "Infinity", ("NaN", "Infinity")),
        ('{"a": [1, -Infinity]}', "12", ('{"a": [1, -Infinity]}', "12")),
    ],
)
def test_answers_that_are_not_text_are_shown_as_json(tmp_path, answer, reference, shown) -> None:
    """Python's json reads NaN and Infinity; embedded raw, JSON.parse failed and the page was
    blank. An object showed as "[object Object]". Such values are shown as JSON text."""
    record = json.loads(sample_line(NPR_TRACE, "roots", 0, True, True))
    line = json.dumps(record)[:-1] + f', "answer": {answer}, "reference": {reference}}}'
    path = tmp_path / "nan.jsonl"
    path.write_text(line + "\n")
    assert main(["view", str(path), "-o", str(tmp_path / "page.html")]) == 0
    [sample] = embedded_data((tmp_path / "page.html").read_text("utf-8"))["samples"]
    assert (sample["answer"], sample["reference"]) == shown


def test_page_is_self_contained_and_escapes_text(samples_file) -> None:
    errors: list[str] = []
    page = render_page(load_views(samples_file, errors))
    assert errors == []
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    # the only URL is the SVG namespace name, which is never fetched
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "</script><script>alert(1)" not in page
    assert page.count("</script>") == 2


def test_cli_view(tmp_path, samples_file, capsys) -> None:
    output = tmp_path / "page.html"
    assert main(["view", str(samples_file), "-o", str(output)]) == 0
    assert output.is_file() and "roots · sample 2" in output.read_text()
    assert main(["view", str(tmp_path / "missing.jsonl"), "-o", str(output)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_view_keeps_its_input_and_checks_limit(tmp_path, samples_file, capsys) -> None:
    """-o naming an input file overwrote the samples with the page; --limit 0 or less wrote an
    empty page without a word."""
    kept = samples_file.read_bytes()
    link = tmp_path / "link.html"
    link.symlink_to(samples_file)
    for output in (samples_file, link):
        assert main(["view", str(samples_file), "-o", str(output)]) == 2
        assert "is an input file" in capsys.readouterr().err
    assert samples_file.read_bytes() == kept
    for limit in ("0", "-1"):
        with pytest.raises(SystemExit) as exit:
            main(["view", str(samples_file), "--limit", limit, "-o", str(tmp_path / "p.html")])
        assert exit.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert main(["view", str(samples_file), "--limit", "2", "-o", str(tmp_path / "p.html")]) == 0
    page = (tmp_path / "p.html").read_text("utf-8")
    assert [s["title"] for s in embedded_data(page)["samples"]] == [
        "roots · sample 0", "roots · sample 1"
    ]  # fmt: skip


# --- in a real browser --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "out" / "test-artifacts"


@pytest.fixture
def browser_page(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data dir
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            viewport={"width": 1400, "height": 900},
        )
        page = context.new_page()
        requests: list[str] = []
        page_errors: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        yield page, requests, page_errors
        context.close()


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path, samples_file, browser_page) -> None:
    page, requests, page_errors = browser_page
    html = tmp_path / "page.html"
    assert main(["view", str(samples_file), "-o", str(html)]) == 0
    page.goto(html.as_uri())

    assert page.locator("#samples li").count() == 4
    assert page.inner_text("#sample-title") == "roots · sample 0"
    # blocks with branches side by side: the two steps share a row
    steps = page.locator("#graph .branches .node.k-step")
    assert steps.count() == 2
    first, second = steps.nth(0).bounding_box(), steps.nth(1).bounding_box()
    assert abs(first["y"] - second["y"]) < 1 and second["x"] > first["x"] + first["width"]
    # the critical path is marked, and drawn as edges
    assert page.locator(".node.critical").count() == 7
    assert page.locator("#edges path.critical").count() == 6

    # clicking a node shows its text
    graph = ng.parse(NPR_TRACE, lenient=True)
    steps.nth(1).click()
    assert page.inner_text("#detail-text").strip() == graph.nodes[5].text.strip()
    assert "step 2" in page.inner_text("#detail-title")

    # markup in node text is shown as text, never run
    page.locator("#samples li", has_text="sample 3").click()
    page.locator(".node.k-takeaway").click()
    assert SECRET in page.inner_text("#detail-text")
    assert page.locator("#graph b").count() == 0

    # filters
    page.click("button[data-filter=incorrect]")
    assert page.locator("#samples li").all_inner_texts()[0].startswith("roots · sample 1")
    assert page.locator("#samples li").count() == 1
    page.click("button[data-filter=invalid]")
    assert page.locator("#samples li").count() == 1
    assert page.inner_text("#sample-title") == "roots · sample 2"
    # the invalid sample's violations are highlighted and listed
    assert page.locator(".node.violation").count() >= 1
    assert "branch_count: 1 steps for 2 plans" in page.inner_text("#violations")
    page.locator(".node.violation").first.click()
    assert page.locator("#detail-violations li").count() >= 1
    page.click("button[data-filter=correct]")
    assert page.locator("#samples li").count() == 3

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "viewer.png"
    page.click("button[data-filter=all]")
    page.locator("#samples li").first.click()
    page.locator(".node.k-step").first.click()
    page.screenshot(path=str(screenshot))
    print(f"viewer screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    assert page_errors == []
    assert all(url.startswith("file://") for url in requests), requests


def rollout_line(node_advantages) -> str:
    """A line shaped like npr train's rollouts.jsonl: an eval sample's fields and training's."""
    record = json.loads(sample_line(NPR_TRACE, "roots", 1, True, True))
    record.update(step=3, trained=True, left_out=None, advantage=0.5)
    record["node_advantages"] = node_advantages
    return json.dumps(record)


def test_training_rollouts_show_the_advantage_of_each_node(tmp_path) -> None:
    graph = ng.parse(NPR_TRACE, lenient=True)
    credit = [None] + [0.5] * (len(graph.nodes) - 1)
    steps = [node.id for node in graph.nodes_of("step")]
    credit[steps[0]], credit[steps[1]] = 0.75, 0.25
    path = tmp_path / "rollouts.jsonl"
    odd = [credit[:-1], [float("nan")] * len(credit), [True] * len(credit), "0.5"]
    path.write_text("\n".join(rollout_line(c) for c in [credit, *odd]) + "\n")
    views = load_views(path, errors := [])
    assert errors == []
    assert views[0]["title"] == "step 3 · roots · sample 1"
    assert [node["advantage"] for node in views[0]["nodes"]] == credit
    shown = dict(views[0]["metrics"])
    assert (shown["step"], shown["trained"], shown["advantage"]) == ("3", "true", "0.500")
    for view in views[1:]:  # advantages that do not fit the graph are not shown
        assert all(node["advantage"] is None for node in view["nodes"])


def test_view_selects_training_steps_without_parsing_the_others(tmp_path, monkeypatch) -> None:
    """A rollout log holds every logged step; --step N (repeatable) or last keeps those records
    and skips the other lines unparsed, so a page of one step of a long run is quick to make."""

    def at_step(step: int, sample: int) -> str:
        record = json.loads(rollout_line(None))
        del record["step"]
        record = {"step": step, **record, "sample": sample}  # as npr train writes it: step first
        return json.dumps(record)

    path = tmp_path / "rollouts.jsonl"
    lines = [at_step(step, sample) for step in (10, 20, 30) for sample in (0, 1)]
    lines.insert(2, '{"step": 10, "cut at a kill')  # a torn line of a step not asked for
    path.write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(Path, "read_bytes", lambda *a, **k: pytest.fail("read whole"))
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(
        json, "loads", lambda text, **k: parsed.append(text) or real_loads(text, **k)
    )
    views = load_views(path, errors := [], steps=[20])
    assert errors == []
    assert [v["title"] for v in views] == [
        "step 20 · roots · sample 0",
        "step 20 · roots · sample 1",
    ]
    assert len(parsed) == 2, "lines of other steps are not parsed"
    monkeypatch.setattr(json, "loads", real_loads)

    assert [v["title"][:7] for v in load_views(path, [], steps=["last"])] == ["step 30"] * 2
    assert len(load_views(path, [], steps=[10, 30], limit=3)) == 3
    assert load_views(path, errors := [], steps=[25, 40]) == []
    assert errors == [f"{path}: no record of step 25, 40; steps logged: 10, 20, 30"]
    samples = tmp_path / "samples.jsonl"  # npr eval's samples log no step
    samples.write_text(sample_line(NPR_TRACE, "roots", 0, True, True) + "\n")
    assert load_views(samples, errors := [], steps=["last"]) == []
    assert errors == [f"{samples}: no record of step last; steps logged: none"]

    page = tmp_path / "page.html"
    assert main(["view", str(path), "--step", "30", "--step", "20", "-o", str(page)]) == 0
    assert page.read_text().count("step 30 · roots") == 2
    assert page.read_text().count("step 20 · roots") == 2
    assert main(["view", str(path), "--step", "10", "-o", str(page)]) == 1  # the torn line
    for bad in ("-1", "first", "2.5"):
        with pytest.raises(SystemExit):
            main(["view", str(path), "--step", bad, "-o", str(page)])


@pytest.mark.slow
def test_node_advantages_in_headless_chromium(tmp_path, browser_page) -> None:
    page, _, page_errors = browser_page
    graph = ng.parse(NPR_TRACE, lenient=True)
    credit = [None] * len(graph.nodes)
    first, second = (node.id for node in graph.nodes_of("step"))
    credit[first], credit[second] = 0.75, -0.25
    source, html = tmp_path / "rollouts.jsonl", tmp_path / "page.html"
    source.write_text(rollout_line(credit) + "\n")
    assert main(["view", str(source), "-o", str(html)]) == 0
    page.goto(html.as_uri())
    assert page.locator(".node .adv").all_inner_texts() == ["A +0.750", "A -0.250"]
    assert page.locator(".node .adv.neg").count() == 1
    page.locator(".node.k-step").nth(1).click()
    assert "advantage -0.250" in page.inner_text("#detail-meta")
    page.locator(".node.k-plan").first.click()
    assert "advantage" not in page.inner_text("#detail-meta")
    assert page_errors == []


def test_cli_view_with_nothing_to_show_writes_no_page(tmp_path, samples_file, capsys) -> None:
    """A step no file logs, or an empty file: an error and no page (it said "wrote" over an
    empty page); a page with some samples still comes with the other files' errors."""
    output = tmp_path / "page.html"
    assert main(["view", str(samples_file), "--step", "99", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert "no record of step 99" in err and f"no sample to show; {output} not written" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["view", str(empty), "-o", str(output)]) == 2
    assert "no sample to show" in capsys.readouterr().err and not output.exists()
    assert main(["view", str(samples_file), str(empty), "-o", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out and output.is_file()
