"""Write the PrometheusRule of the kustomize component from the plain rules file.

The plain file (``quiesce-rules.yaml``) is the one source: its groups become the
PrometheusRule's ``spec`` line for line, comments included, so the two cannot drift
(``tests/observability/test_rules.py`` checks the committed copy is this output).

    python deploy/prometheus/render_prometheusrule.py          # rewrite the component
    python deploy/prometheus/render_prometheusrule.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
RULES: Final = HERE / "quiesce-rules.yaml"
COMPONENT: Final = HERE.parent / "k8s" / "components" / "prometheus-rules"
OUTPUT: Final = COMPONENT / "prometheusrule.yaml"

HEADER: Final = """\
# GENERATED from deploy/prometheus/quiesce-rules.yaml by
# deploy/prometheus/render_prometheusrule.py: edit that file, then run this script.
#
# Many Prometheus Operator installations only pick up PrometheusRules carrying a given
# label (e.g. `release: kube-prometheus-stack`): add it in your overlay.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: quiesce
  labels:
    app.kubernetes.io/name: quiesce
    app.kubernetes.io/component: worker
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule: the plain file's body, leading comments dropped, under ``spec``."""
    lines = rules_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(f"  {line}" if line else "" for line in lines[start:])
    return HEADER + body + "\n"


def main(argv: list[str]) -> int:
    wanted = render(RULES.read_text(encoding="utf-8"))
    if "--check" in argv:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != wanted:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
