#!/usr/bin/env python3
"""Offline, strict validation of the chart's rendered manifests (scripts/chart/check.sh).

1. Schemas. Built-in kinds against kubernetes-validate's strict OpenAPI schemas of one Kubernetes
   version (unknown fields are errors); custom resources against JSON schemas converted from their
   operators' CRDs (openAPIV3Schema; unknown fields are errors there too), their metadata against
   the strict ObjectMeta. A kind with no schema is an error.
2. partita's own rules: every scorer's and worker's probes hit /livez or /readyz on the port of
   the rendered `[node] http_listen`; its termination grace exceeds `[node] grace` plus the node's
   own 10 s bound on a stop.
3. For `partita check-config`: writes each scorer and worker StatefulSet's partita.toml and environment
   (literal values; secrets and field references as placeholders) into --out.

usage: validate.py --k8s 1.33.0 --crds DIR --out DIR RENDERED.yaml
"""
import argparse, copy, glob, os, re, sys, tomllib
import yaml, jsonschema
import kubernetes_validate.utils as kvu

JUNCTORS = ("allOf", "anyOf", "oneOf")


def crd_to_jsonschema(node, in_junctor=False):
    """Structural CRD schema -> JSON schema that rejects unknown fields.

    - object with `properties`, no `additionalProperties`, not preserve-unknown-fields
      -> additionalProperties: false (what the API server's pruning/strict field validation does)
    - x-kubernetes-preserve-unknown-fields: true -> left open
    - x-kubernetes-int-or-string: true -> anyOf integer|string (type removed)
    - x-kubernetes-embedded-resource: true -> apiVersion/kind/metadata allowed
    - nullable: true -> null also accepted
    - never adds additionalProperties inside allOf/anyOf/oneOf/not branches: in structural
      schemas those only restate a subset of the parent's properties (e.g. oneOf of `required`)
    - x-kubernetes-validations (CEL) are dropped (not checkable with JSON schema)
    """
    if isinstance(node, list):
        return [crd_to_jsonschema(n, in_junctor) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k == "nullable":
            continue
        if k == "properties":
            out[k] = {p: crd_to_jsonschema(s, in_junctor) for p, s in v.items()}
        elif k in ("items", "additionalProperties"):
            out[k] = crd_to_jsonschema(v, in_junctor)
        elif k in JUNCTORS or k == "not":
            out[k] = crd_to_jsonschema(v, True)
        else:
            out[k] = v
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        if "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (not in_junctor and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def load_crd_schemas(dirs):
    schemas = {}
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, "*.y*ml"))):
            for doc in yaml.safe_load_all(open(f)):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    s = v.get("schema", {}).get("openAPIV3Schema")
                    if not s or not v.get("served", True):
                        continue
                    js = crd_to_jsonschema(copy.deepcopy(s))
                    js.setdefault("properties", {})
                    js["properties"]["apiVersion"] = {"const": f"{spec['group']}/{v['name']}"}
                    js["properties"]["kind"] = {"const": spec["names"]["kind"]}
                    js["properties"].setdefault("metadata", {"type": "object"})
                    js["properties"].setdefault("status", {"type": "object"})
                    js["additionalProperties"] = False  # root: CRDs leave it open
                    js["required"] = sorted(set(js.get("required", [])) | {"apiVersion", "kind", "metadata"})
                    schemas[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = js
    return schemas




def seconds(d):
    m = re.fullmatch(r"(\d+)(ms|s|m)", d)
    if not m:
        raise ValueError(f"duration {d!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


def partita_checks(docs, out):
    """The chart's rules about partita itself; returns error messages."""
    errors = []
    configs = {d["metadata"]["name"]: d["data"] for d in docs if d.get("kind") == "ConfigMap"}
    nodes = [d for d in docs if d.get("kind") == "StatefulSet"
             and d["metadata"]["labels"].get("app.kubernetes.io/component") in ("scorer", "worker")]
    if not any(d["metadata"]["labels"]["app.kubernetes.io/component"] == "scorer" for d in nodes):
        errors.append("no scorer StatefulSet rendered")
    for s in nodes:
        name = s["metadata"]["name"]
        pod = s["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == "partita"]
        (vol,) = [v for v in pod["volumes"] if v["name"] == "config"]
        toml_text = configs[vol["configMap"]["name"]]["partita.toml"]
        config = tomllib.loads(toml_text)
        node = config.get("node", {})
        http_port = int(node["http_listen"].rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c.get(probe, {}).get("httpGet")
            if not get:
                errors.append(f"{name}: no {probe} over HTTP")
                continue
            port = ports.get(get["port"], get["port"])
            if port != http_port or get["path"] not in ("/livez", "/readyz"):
                errors.append(f"{name}: {probe} GET :{port}{get['path']} is not served "
                              f"(the node serves /livez and /readyz on :{http_port})")
        grace = seconds(node.get("grace", "20s"))
        if pod["terminationGracePeriodSeconds"] <= grace + 10:
            errors.append(f"{name}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} "
                          f"does not exceed [node] grace {grace} s + 10 s")
        env = []
        for e in c.get("env", []):
            if "value" in e:
                value = re.sub(r"\$\((\w+)\)", "placeholder", e["value"])
            elif "fieldRef" in e.get("valueFrom", {}):
                value = f"{name}-0"
            else:
                value = "placeholder"
            env.append(f"{e['name']}={value}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.toml"), "w") as f:
            f.write(toml_text)
        with open(os.path.join(out, f"{name}.env"), "w") as f:
            f.write("\n".join(env) + "\n")
    return errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s", default="1.33.0")
    ap.add_argument("--crds", action="append", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("rendered")
    a = ap.parse_args()
    crd = load_crd_schemas(a.crds)
    meta_probe = {"apiVersion": "v1", "kind": "ConfigMap"}
    docs = [d for d in yaml.safe_load_all(open(a.rendered)) if d]
    errors = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{key[1]}/{(doc.get('metadata') or {}).get('name')}"
        try:
            if key in crd:
                v = jsonschema.Draft202012Validator(crd[key])
                for e in sorted(v.iter_errors(doc), key=lambda e: list(e.path)):
                    errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
                kvu.validate(dict(meta_probe, metadata=doc.get("metadata")), a.k8s, strict=True)
            else:
                kvu.validate(doc, a.k8s, strict=True)
        except kvu.SchemaNotFoundError as e:
            errors.append(f"{name}: no schema ({e.message})")
        except kvu.ValidationError as e:
            errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
    errors += partita_checks(docs, a.out)
    kinds = sorted({d["kind"] for d in docs})
    for e in errors:
        print(f"ERROR {e}")
    print(f"{a.rendered}: {len(docs)} objects ({', '.join(kinds)}), {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
