"""The Kubernetes manifests as kubectl would apply them: a small `kustomize build` that covers exactly what
deploy/kubernetes uses (resources, components, patch files by kind and name, image names), so tests see the
objects a cluster gets without a kustomize binary. `used_features` lets a test fail when a file uses more."""

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}


def _kustomization(folder: Path) -> Obj:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def used_features(folder: Path) -> set[str]:
    """Every kustomization key (and patch form) used under `folder` that build() does not implement."""
    unsupported = set()
    for path in folder.rglob("kustomization.yaml"):
        spec = yaml.safe_load(path.read_text())
        unsupported |= set(spec) - SUPPORTED_KEYS
        unsupported |= {f"patches.{key}" for patch in spec.get("patches", []) for key in patch if key != "path"}
    return unsupported


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these objects: maps recursively, null deletes a key, lists of
    named items (containers, env, volumes, mounts) merged by name, other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        by_name = {item["name"]: item for item in base}
        merged_list = [_merge(item, next((p for p in patch if p["name"] == item["name"]), {})) for item in base]
        return merged_list + [p for p in patch if p["name"] not in by_name]
    return patch


def _identity(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _apply_patch(objects: list[Obj], patch: Obj) -> list[Obj]:
    target = _identity(patch)
    assert any(_identity(obj) == target for obj in objects), f"patch of {target}, which is not a resource"
    if patch.get("$patch") == "delete":
        return [obj for obj in objects if _identity(obj) != target]
    return [_merge(obj, patch) if _identity(obj) == target else obj for obj in objects]


def build(folder: Path, extra_components: tuple[Path, ...] = ()) -> list[Obj]:
    """The objects of the kustomization in `folder`, with `extra_components` added to its components."""
    spec = _kustomization(folder)
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for component in [folder / c for c in spec.get("components", [])] + list(extra_components):
        objects += build(component)
        for patch in _kustomization(component).get("patches", []):
            objects = _apply_patch(objects, yaml.safe_load((component / patch["path"]).read_text()))
    if spec["kind"] == "Kustomization":  # a component's patches are applied by whoever includes it
        for patch in spec.get("patches", []):
            objects = _apply_patch(objects, yaml.safe_load((folder / patch["path"]).read_text()))
    objects = copy.deepcopy(objects)
    for image in spec.get("images", []):
        for obj in objects:
            for container in pod_spec(obj).get("containers", []) if obj["kind"] == "Deployment" else []:
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    return objects


def pod_spec(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]["spec"]


def one(objects: list[Obj], kind: str) -> Obj:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found
