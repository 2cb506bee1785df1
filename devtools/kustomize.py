"""A small Kustomize renderer for deploy/k8s: resources, generators, strategic-merge patches, images, labels."""

from __future__ import annotations

import argparse
import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KNOWN_KEYS = frozenset({
    "apiVersion", "kind", "resources", "namespace", "commonLabels", "configMapGenerator", "secretGenerator",
    "generatorOptions", "patches", "images",
})
#: Kinds that have no namespace (the namespace transformer leaves them alone).
CLUSTER_SCOPED = frozenset({"ClusterRole", "ClusterRoleBinding", "Namespace", "CustomResourceDefinition"})
#: Kinds whose pod template, selector and labels commonLabels reaches (as kustomize's label transformer).
WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})


class KustomizeError(ValueError):
    """A kustomization this renderer does not understand (never rendered halfway)."""


def _load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _generated(spec: Obj, folder: Path, kind: str) -> Obj:
    data: dict[str, str] = {}
    for entry in spec.get("files", []):
        key, _, name = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (folder / name).read_text()
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    return obj


def _generate(objects: list[Obj], specs: list[Obj], folder: Path, kind: str) -> None:
    for spec in specs:
        made = _generated(spec, folder, kind)
        behavior = spec.get("behavior", "create")
        index = next((i for i, o in enumerate(objects) if _key(o) == _key(made)), None)
        if behavior == "create":
            if index is not None:
                raise KustomizeError(f"{kind} {spec['name']} exists already: use behavior replace or merge")
            objects.append(made)
        elif index is None:
            raise KustomizeError(f"{kind} {spec['name']}: behavior {behavior} but no such {kind} to change")
        elif behavior == "replace":
            objects[index] = {**made, "metadata": objects[index]["metadata"]}
        elif behavior == "merge":
            objects[index]["data"] = {**objects[index].get("data", {}), **made["data"]}
        else:
            raise KustomizeError(f"{kind} {spec['name']}: unknown behavior {behavior!r}")


def strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merged key by key; lists of named maps merged by name (containers, volumes, ports, env); else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(item, dict) and "name" in item for item in base + patch)):
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(merged_list) if old["name"] == item["name"]), None)
            if at is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[at] = strategic_merge(merged_list[at], item)
        return merged_list
    return copy.deepcopy(patch)


def _patch(objects: list[Obj], entry: Obj, folder: Path) -> None:
    if "target" in entry or set(entry) - {"path", "patch"}:
        raise KustomizeError(f"only strategic-merge patches by path or inline are rendered here, not {entry}")
    documents = _load(folder / entry["path"]) if "path" in entry else list(yaml.safe_load_all(entry["patch"]))
    for patch in documents:
        index = next((i for i, o in enumerate(objects) if _key(o) == _key(patch)), None)
        if index is None:
            raise KustomizeError(f"patch for {_key(patch)}: no such resource")
        objects[index] = strategic_merge(objects[index], patch)


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    return []


def _set_images(objects: list[Obj], images: list[Obj]) -> None:
    for obj in objects:
        for spec in _pod_specs(obj):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                for image in images:
                    if image["name"] == name:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def _label(objects: list[Obj], labels: dict[str, str]) -> None:
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(labels)
        spec = obj.get("spec", {})
        if obj["kind"] in WORKLOADS:
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
            spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        elif obj["kind"] == "Service" and "selector" in spec:
            spec["selector"].update(labels)
        elif obj["kind"] == "PodDisruptionBudget":
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)


def _set_namespace(objects: list[Obj], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace


def build(folder: Path) -> list[Obj]:
    """The objects `kustomize build folder` makes, for the features deploy/k8s uses (others are refused)."""
    folder = Path(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{folder}/kustomization.yaml: not rendered here: {sorted(unknown)}")
    if not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash", True):
        raise KustomizeError("generated names with a hash suffix are not rendered here")
    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        objects += build(path) if path.is_dir() else _load(path)
    _generate(objects, kustomization.get("configMapGenerator", []), folder, "ConfigMap")
    _generate(objects, kustomization.get("secretGenerator", []), folder, "Secret")
    for entry in kustomization.get("patches", []):
        _patch(objects, entry, folder)
    _set_images(objects, kustomization.get("images", []))
    _label(objects, kustomization.get("commonLabels", {}))
    if "namespace" in kustomization:
        _set_namespace(objects, kustomization["namespace"])
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        if _key(obj) in seen:
            raise KustomizeError(f"{_key(obj)} defined twice")
        seen.add(_key(obj))
    return objects


def _block_strings(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render a deploy/k8s overlay (as `kustomize build` would)")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        objects = build(args.folder)
    except (KustomizeError, OSError, yaml.YAMLError) as exc:
        print(f"kustomize: {exc}", file=sys.stderr)
        return 2
    yaml.add_representer(str, _block_strings, Dumper=yaml.SafeDumper)
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
