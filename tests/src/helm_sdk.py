"""Real Helm for the chart tests, run by tests/src/helm.rs.

helm-python-sdk binds Helm v4's own Go SDK (chart loading, the template
engine, values coalescing, values.schema.json validation, lint), so this is
what `helm template` and `helm lint` do, without a helm binary. One JSON
request on stdin, one JSON answer on stdout:

  {"op": "template", "chart": DIR, "name": N, "namespace": NS, "values": {...}}
      -> {"manifests": {"sluice/templates/x.yaml": TEXT, ...}}
  {"op": "lint", "chart": DIR, "namespace": NS, "values": {...}}
      -> {"report": {"messages": [{"severity": 0-3, "path", "error"}], "errors": [...]}}
  {"op": "version"} -> {"helm": "v4.x.y"}

A failure (bad values, a template error) is {"error": MESSAGE}.
"""

import json
import sys

import helm_python as helm


def main() -> None:
    request = json.load(sys.stdin)
    op = request["op"]
    try:
        if op == "template":
            with helm.Chart.load(request["chart"]) as chart:
                # As `helm install` renders: the schema is checked against
                # the coalesced values first, then every template renders.
                manifests = chart.render(
                    request.get("values"),
                    name=request["name"],
                    namespace=request["namespace"],
                    is_install=True,
                )
            answer = {"manifests": manifests}
        elif op == "lint":
            answer = {
                "report": helm.lint(
                    request["chart"],
                    request.get("values"),
                    strict=True,
                    namespace=request["namespace"],
                )
            }
        elif op == "version":
            answer = {"helm": helm.helm_sdk_version()}
        else:
            answer = {"error": f"unknown op {op!r}"}
    except helm.HelmError as e:
        answer = {"error": str(e)}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
