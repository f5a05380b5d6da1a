"""Checks of bench/chart.py on synthetic data (`make test` runs them):
the SVG must parse, carry its axes, ticks, legend and one marker per
message that arrived, and keep every point inside the plot."""

import math
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chart  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
MARKS = (f"{SVG}circle", f"{SVG}rect", f"{SVG}polygon")


def parse(text: str) -> ET.Element:
    return ET.fromstring(text)


def texts(root: ET.Element, cls: str) -> list[str]:
    group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == cls)
    return [t.text or "" for t in group.iter(f"{SVG}text")]


def markers(series: ET.Element) -> list[tuple[float, float]]:
    out = []
    for el in series:
        if el.tag == f"{SVG}circle":
            out.append((float(el.get("cx")), float(el.get("cy"))))
        elif el.tag == f"{SVG}rect":
            out.append((float(el.get("x")) + float(el.get("width")) / 2, float(el.get("y")) + float(el.get("height")) / 2))
        elif el.tag == f"{SVG}polygon":
            pts = [tuple(map(float, p.split(","))) for p in el.get("points").split()]
            out.append((sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)))
    return out


class LatencyChart(unittest.TestCase):
    def series(self):
        times = [i * 0.1 for i in range(20)]
        return [
            ("poolrelay", [(t, 40.0 + (i % 5) * 5) for i, t in enumerate(times)]),
            ("poolrelay reserve 1", [(t, 2.0 + (i % 3)) for i, t in enumerate(times)]),
            ("postfix", [(t, None if i == 7 else 30.0 + i) for i, t in enumerate(times)]),
        ]

    def test_parses_with_axes_ticks_legend_and_every_point(self):
        root = parse(chart.latency_chart("Shared workers & <test>", self.series()))
        self.assertEqual(root.tag, f"{SVG}svg")
        self.assertEqual(root.find(f"{SVG}title").text, "Shared workers & <test>")
        y_ticks = texts(root, "y-ticks")
        x_ticks = texts(root, "x-ticks")
        self.assertGreaterEqual(len(y_ticks), 3, y_ticks)
        self.assertGreaterEqual(len(x_ticks), 3, x_ticks)
        self.assertEqual(x_ticks[0], "0")
        all_text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
        self.assertIn("latency", all_text)
        self.assertIn("sent at", all_text)
        legend = [" ".join(t.text or "" for t in g.iter(f"{SVG}text")) for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
        self.assertEqual(legend, ["poolrelay", "poolrelay reserve 1", "postfix (1 never arrived)"])
        groups = [g for g in root.iter(f"{SVG}g") if g.get("class") == "series"]
        self.assertEqual([g.get("data-label") for g in groups], ["poolrelay", "poolrelay reserve 1", "postfix"])
        self.assertEqual([len(markers(g)) for g in groups], [20, 20, 19])
        # Distinct colours per series.
        fills = [next(el.get("fill") for el in g if el.tag in MARKS) for g in groups]
        self.assertEqual(len(set(fills)), 3, fills)

    def test_points_lie_inside_the_plot_and_keep_their_order(self):
        root = parse(chart.latency_chart("t", self.series()))
        frame = next(r for r in root.iter(f"{SVG}rect") if r.get("fill") == "none")
        x0, y0 = float(frame.get("x")), float(frame.get("y"))
        x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
        groups = [g for g in root.iter(f"{SVG}g") if g.get("class") == "series"]
        for g in groups:
            for x, y in markers(g):
                self.assertTrue(x0 - 0.5 <= x <= x1 + 0.5 and y0 - 0.5 <= y <= y1 + 0.5, (g.get("data-label"), x, y))
        # Higher latency is drawn higher (smaller y): poolrelay's 40+ ms above reserve's 2-4 ms.
        slow = markers(groups[0])
        fast = markers(groups[1])
        self.assertLess(max(y for _, y in slow), min(y for _, y in fast))
        # Later messages further right.
        xs = [x for x, _ in fast]
        self.assertEqual(xs, sorted(xs))

    def test_wide_ranges_switch_to_a_log_axis(self):
        series = [("poolrelay", [(0.0, 0.2), (0.25, 0.4)]), ("postfix", [(0.0, 38000.0), (0.25, 52000.0)])]
        root = parse(chart.latency_chart("t", series))
        ticks = texts(root, "y-ticks")
        self.assertIn("0.1", ticks)
        self.assertIn("100,000", ticks)
        self.assertTrue(any("log scale" in (t.text or "") for t in root.iter(f"{SVG}text")))

    def test_latency_of_zero_or_less_is_drawn_hollow_on_a_labelled_floor(self):
        # A relay can deliver before its 250 reaches the client: a negative latency.
        series = [("poolrelay", [(0.0, 0.2), (0.25, -1.0), (0.5, 0.0)]), ("postfix", [(0.0, 38000.0), (0.25, 52000.0)])]
        root = parse(chart.latency_chart("t", series))
        ticks = texts(root, "y-ticks")
        self.assertEqual(ticks[0], "≤ 0.1")
        group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "series")
        hollow = [el for el in group if el.tag in MARKS and el.get("fill") == "#ffffff"]
        self.assertEqual(len(hollow), 2)
        frame = next(r for r in root.iter(f"{SVG}rect") if r.get("fill") == "none")
        bottom = float(frame.get("y")) + float(frame.get("height"))
        for _, y in markers(group)[1:]:
            self.assertAlmostEqual(y, bottom, delta=0.5)
        self.assertTrue(any(t.get("class") == "footnote" for t in root.iter(f"{SVG}text")))
        # Without such values: no floor label, no footnote.
        root = parse(chart.latency_chart("t", [("poolrelay", [(0.0, 0.2), (0.25, 0.4)]), ("postfix", [(0.0, 38000.0)])]))
        self.assertFalse(texts(root, "y-ticks")[0].startswith("≤"))
        self.assertFalse(any(t.get("class") == "footnote" for t in root.iter(f"{SVG}text")))

    def test_negative_values_on_a_linear_axis_stay_inside_the_plot(self):
        root = parse(chart.latency_chart("t", [("postfix", [(0.0, -5.0), (0.1, 20.0), (0.2, 25.0)])]))
        self.assertLessEqual(float(texts(root, "y-ticks")[0].replace(",", "")), -5.0)
        frame = next(r for r in root.iter(f"{SVG}rect") if r.get("fill") == "none")
        y_bottom = float(frame.get("y")) + float(frame.get("height"))
        group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "series")
        self.assertTrue(all(y <= y_bottom + 0.5 for _, y in markers(group)))

    def test_nothing_arrived_still_draws_a_valid_chart(self):
        root = parse(chart.latency_chart("t", [("postfix", [(0.0, None), (0.1, None)])]))
        legend = [" ".join(t.text or "" for t in g.iter(f"{SVG}text")) for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
        self.assertEqual(legend, ["postfix (2 never arrived)"])

    def test_ticks_are_round_and_cover_the_data(self):
        lo, hi, ticks = chart.linear_ticks(0.0, 1.9)
        self.assertLessEqual(lo, 0.0)
        self.assertGreaterEqual(hi, 1.9)
        steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
        self.assertEqual(len(steps), 1)
        step = steps.pop()
        mantissa = step / 10 ** math.floor(math.log10(step))
        self.assertIn(round(mantissa, 6), (1.0, 2.0, 5.0))

    def test_write_charts_draws_each_emergency_scenario_from_results(self):
        def row(relay, variant=None, label=None):
            r = {"relay": relay, "bulk_messages": 300, "latency_ms_in_send_order": [1.0, None, 3.0],
                 "sent_at_s": [0.0, 0.1, 0.2]}
            if variant:
                r["variant"] = variant
            if label:
                r["label"] = label
            return r

        res = {
            "scale": 0.01,
            "emergency": [row("poolrelay", "backlog"), row("postfix", "backlog"), row("poolrelay", "arriving")],
            "shared_workers": [row("poolrelay", label="poolrelay"), row("poolrelay", label="poolrelay reserve 1"),
                               row("postfix", label="postfix")],
        }
        with tempfile.TemporaryDirectory() as d:
            paths = chart.write_charts(res, Path(d))
            self.assertEqual([p.name for p in paths],
                             ["emergency-backlog.svg", "emergency-arriving.svg", "emergency-shared-workers.svg"])
            shared = ET.parse(paths[2]).getroot()
            labels = [g.get("data-label") for g in shared.iter(f"{SVG}g") if g.get("class") == "series"]
            self.assertEqual(labels, ["poolrelay", "poolrelay reserve 1", "postfix"])
            backlog = ET.parse(paths[0]).getroot()
            labels = [g.get("data-label") for g in backlog.iter(f"{SVG}g") if g.get("class") == "series"]
            self.assertEqual(labels, ["poolrelay", "postfix"])


if __name__ == "__main__":
    unittest.main()
