"""The example Kubernetes manifest (examples/kubernetes/pymap-daemonset.yaml), read
as the tests need it, and turned into the ``podman run`` flags that run one of its
containers as a kubelet would: so the image test and the manifest cannot drift."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples/kubernetes/pymap-daemonset.yaml"


def documents() -> dict[str, dict]:
    """{kind: document} for the manifest's documents (one of each kind)."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    out = {d["kind"]: d for d in docs}
    assert len(out) == len(docs), "one document of each kind expected"
    return out


def pod_spec() -> dict:
    return documents()["DaemonSet"]["spec"]["template"]["spec"]


def container(name: str) -> dict:
    (found,) = [c for c in pod_spec()["containers"] if c["name"] == name]
    return found


def config_map_data() -> dict[str, str]:
    return documents()["ConfigMap"]["data"]


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(q[: -len(suffix)]) * factor
    return int(q)


def podman_run_args(name: str, *, host_paths: dict[str, str], config_dir: Path,
                    network: str = "host") -> list[str]:
    """``podman run`` options (no image, no command) for container ``name``.

    ``host_paths`` replaces a hostPath volume's path (the test's temp socket directory
    for /run/pymap); ``config_dir`` holds the ConfigMap's files. Everything else is
    read from the manifest; a setting this function does not know fails the test, so
    a new one in the manifest cannot be silently left out.

    ``network``: the pod network has no counterpart here; the host's, with the test's
    own loopback port in the config, stands for it.
    """
    spec = pod_spec()
    c = container(name)
    args = ["--network", network]
    known_pod = {"hostPID", "securityContext", "tolerations", "containers", "volumes"}
    assert set(spec) <= known_pod, f"pod settings not modelled: {set(spec) - known_pod}"
    if spec.get("hostPID"):
        args += ["--pid", "host"]
    pod_sc = spec.get("securityContext", {})
    assert set(pod_sc) <= {"supplementalGroups"}, f"pod securityContext not modelled: {pod_sc}"
    for gid in pod_sc.get("supplementalGroups", []):
        args += ["--group-add", str(gid)]
    sc = c.get("securityContext", {})
    known_sc = {"runAsUser", "privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                "capabilities", "seccompProfile"}
    assert set(sc) <= known_sc, f"securityContext not modelled: {set(sc) - known_sc}"
    if "runAsUser" in sc:
        args += ["--user", f"{sc['runAsUser']}:{sc['runAsUser']}"]
    assert not sc.get("privileged")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        # A kubelet adds no tmpfs of its own: only the pod's volumes are writable.
        args += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities", {})
    for cap in caps.get("drop", []):
        args += ["--cap-drop", cap if cap == "ALL" else f"CAP_{cap}"]
    for cap in caps.get("add", []):
        args += ["--cap-add", f"CAP_{cap}"]
    # RuntimeDefault is podman's default seccomp profile too: nothing to add.
    assert sc.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
    for env in c.get("env", []):
        if "value" in env:
            args += ["--env", f"{env['name']}={env['value']}"]
        else:
            assert env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, env
            args += ["--env", f"{env['name']}={socket.gethostname()}"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        ro = ":ro" if m.get("readOnly") else ""
        if "hostPath" in v:
            src = host_paths.get(v["hostPath"]["path"], v["hostPath"]["path"])
            args += ["--volume", f"{src}:{m['mountPath']}{ro}"]
        elif "configMap" in v:
            args += ["--volume", f"{config_dir}:{m['mountPath']}{ro}"]
        elif "emptyDir" in v:
            size = _quantity_bytes(v["emptyDir"].get("sizeLimit", "64Mi"))
            assert v["emptyDir"].get("medium") == "Memory", v
            args += ["--tmpfs", f"{m['mountPath']}:rw,size={size},mode=1777"]
        else:
            raise AssertionError(f"volume kind not modelled: {v}")
    return args


def command(name: str) -> list[str]:
    c = container(name)
    return [*c.get("command", []), *c.get("args", [])]
