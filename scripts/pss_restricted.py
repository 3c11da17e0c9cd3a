#!/usr/bin/env python3
"""Check Kubernetes manifests against the Pod Security Standards "restricted" profile,
plus this project's own rules for the relay's containers.

Usage: pss_restricted.py FILE...      (YAML, several documents per file; "-" is stdin)
       pss_restricted.py --self-test  (feeds it bad manifests and checks that it fails)

Every pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
ReplicationController, Job, CronJob) is checked for what the restricted profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/) forbids:
  baseline: hostNetwork/hostPID/hostIPC, privileged containers, added capabilities
  beyond NET_BIND_SERVICE, hostPath volumes, hostPorts, a non-default procMount,
  Unconfined seccomp or AppArmor, SELinux types and users, unsafe sysctls, Windows
  HostProcess;
  restricted: volume types other than configMap, csi, downwardAPI, emptyDir, ephemeral,
  persistentVolumeClaim, projected, secret; allowPrivilegeEscalation not false;
  runAsNonRoot not true; runAsUser 0; seccompProfile not RuntimeDefault or Localhost;
  capabilities not dropping ALL.
and for this project:
  every container: readOnlyRootFilesystem true;
  a relay container (image or name containing "outbox-relay"): no subPath mounts (they
  never see ConfigMap or Secret updates), cpu and memory requests and a memory limit;
  a relay running `run` beside other containers (a sidecar): no readinessProbe, so that
  the relay's /readyz (503 while it connects) cannot make the application's pod NotReady;
  a relay running `run` alone in its pod: a readinessProbe on /readyz and a
  livenessProbe on /healthz.
Exits 1 and prints every violation, with the file, object and container, if any.
"""
import sys

import yaml

ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t",
                 "container_engine_t"}
POD_TEMPLATE_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def dig(obj, *path):
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def is_relay(container):
    return "outbox-relay" in str(container.get("image", "")) or \
        "outbox-relay" in str(container.get("name", ""))


def runs_relay(container):
    args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    return "run" in args


def check_pod(spec, where):
    errors = []

    def err(msg):
        errors.append(f"{where}: {msg}")

    psc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            err(f"{key}: true is forbidden")
    for vol in spec.get("volumes") or []:
        kinds = [k for k in vol if k != "name"]
        for kind in kinds:
            if kind not in ALLOWED_VOLUMES:
                err(f"volume {vol.get('name')!r} of type {kind} is not allowed "
                    f"(only {', '.join(sorted(ALLOWED_VOLUMES))})")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            err(f"sysctl {sysctl.get('name')} is not in the safe set")

    containers = [("container", c) for c in spec.get("containers") or []]
    containers += [("initContainer", c) for c in spec.get("initContainers") or []]
    containers += [("ephemeralContainer", c) for c in spec.get("ephemeralContainers") or []]
    if not spec.get("containers"):
        err("no containers")

    def effective(csc, key):
        """The container's setting, else the pod's (as the kubelet resolves it)."""
        value = csc.get(key)
        return psc.get(key) if value is None else value

    for what, c in containers:
        name = f"{what} {c.get('name')!r}"
        csc = c.get("securityContext") or {}
        if csc.get("privileged"):
            err(f"{name}: privileged: true is forbidden")
        if csc.get("allowPrivilegeEscalation") is not False:
            err(f"{name}: allowPrivilegeEscalation must be false")
        if effective(csc, "runAsNonRoot") is not True:
            err(f"{name}: runAsNonRoot must be true (pod or container)")
        if effective(csc, "runAsUser") == 0:
            err(f"{name}: runAsUser 0 (root) is forbidden")
        seccomp = dig(csc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            err(f"{name}: seccompProfile.type must be RuntimeDefault or Localhost, "
                f"not {seccomp}")
        apparmor = dig(csc, "appArmorProfile", "type") or dig(psc, "appArmorProfile", "type")
        if apparmor == "Unconfined":
            err(f"{name}: appArmorProfile Unconfined is forbidden")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            err(f"{name}: capabilities.drop must contain ALL")
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                err(f"{name}: capability {cap} may not be added (only NET_BIND_SERVICE)")
        if csc.get("procMount") not in (None, "Default"):
            err(f"{name}: procMount must be Default")
        for sel in (csc.get("seLinuxOptions") or {}, psc.get("seLinuxOptions") or {}):
            if sel.get("type", "") not in SELINUX_TYPES:
                err(f"{name}: seLinuxOptions.type {sel.get('type')} is forbidden")
            if sel.get("user") or sel.get("role"):
                err(f"{name}: seLinuxOptions user/role may not be set")
        if dig(csc, "windowsOptions", "hostProcess") or dig(psc, "windowsOptions", "hostProcess"):
            err(f"{name}: windowsOptions.hostProcess is forbidden")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                err(f"{name}: hostPort {port['hostPort']} is forbidden")
        if what != "ephemeralContainer" and csc.get("readOnlyRootFilesystem") is not True:
            err(f"{name}: readOnlyRootFilesystem must be true")

        if is_relay(c):
            for mount in c.get("volumeMounts") or []:
                if mount.get("subPath") or mount.get("subPathExpr"):
                    err(f"{name}: volumeMount {mount.get('name')!r} uses subPath: mount the "
                        f"directory, or ConfigMap and Secret updates never reach the relay")
            res = c.get("resources") or {}
            for kind, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
                for key in keys:
                    if not dig(res, kind, key):
                        err(f"{name}: resources.{kind}.{key} is missing")

    main = spec.get("containers") or []
    for c in main:
        if not (is_relay(c) and runs_relay(c)):
            continue
        name = f"container {c.get('name')!r}"
        if len(main) > 1:
            if c.get("readinessProbe"):
                err(f"{name}: a relay sidecar must have no readinessProbe: its /readyz "
                    f"(503 while connecting to PostgreSQL) would make the whole "
                    f"application pod NotReady; use a livenessProbe or startupProbe")
        else:
            if dig(c, "readinessProbe", "httpGet", "path") != "/readyz":
                err(f"{name}: a standalone relay needs a readinessProbe on /readyz")
            if dig(c, "livenessProbe", "httpGet", "path") != "/healthz":
                err(f"{name}: a standalone relay needs a livenessProbe on /healthz")
    return errors


def check_documents(docs, source):
    errors, pods = [], 0
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "List":
            e, p = check_documents(doc.get("items") or [], source)
            errors += e
            pods += p
            continue
        path = POD_TEMPLATE_PATHS.get(doc.get("kind"))
        if path is None:
            continue
        where = f"{source}: {doc.get('kind')}/{dig(doc, 'metadata', 'name')}"
        spec = dig(doc, *path)
        if not isinstance(spec, dict):
            errors.append(f"{where}: no pod spec")
            continue
        pods += 1
        errors += check_pod(spec, where)
    return errors, pods


def check_files(paths):
    errors, pods = [], 0
    for path in paths:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            errors.append(f"{path}: not YAML: {e}")
            continue
        e, p = check_documents(docs, path)
        errors += e
        pods += p
    return errors, pods


GOOD = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: relay}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: outbox-relay
          image: x/outbox-relay:1
          args: [--config, /c/relay.toml, run]
          readinessProbe: {httpGet: {path: /readyz, port: 9187}}
          livenessProbe: {httpGet: {path: /healthz, port: 9187}}
          resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 256Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts: [{name: config, mountPath: /c}]
      volumes: [{name: config, configMap: {name: c}}]
"""


def self_test():
    """Each case breaks the good manifest in one way; the checker must name that way."""
    def mutate(fn):
        doc = yaml.safe_load(GOOD)
        fn(doc["spec"]["template"]["spec"])
        return doc

    def relay(spec):
        return spec["containers"][0]

    cases = {
        "privileged": lambda s: relay(s)["securityContext"].update(privileged=True),
        "subPath": lambda s: relay(s)["volumeMounts"][0].update(subPath="relay.toml"),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPID": lambda s: s.update(hostPID=True),
        "allowPrivilegeEscalation": lambda s: relay(s)["securityContext"].pop(
            "allowPrivilegeEscalation"),
        "runAsNonRoot": lambda s: s["securityContext"].pop("runAsNonRoot"),
        "runAsUser 0": lambda s: relay(s)["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda s: s["securityContext"].update(
            seccompProfile={"type": "Unconfined"}),
        "capabilities.drop": lambda s: relay(s)["securityContext"].pop("capabilities"),
        "SYS_ADMIN": lambda s: relay(s)["securityContext"]["capabilities"].update(
            add=["SYS_ADMIN"]),
        "readOnlyRootFilesystem": lambda s: relay(s)["securityContext"].pop(
            "readOnlyRootFilesystem"),
        "hostPort": lambda s: relay(s).update(ports=[{"containerPort": 9187,
                                                      "hostPort": 9187}]),
        "resources.limits.memory": lambda s: relay(s)["resources"].pop("limits"),
        "needs a readinessProbe": lambda s: relay(s).pop("readinessProbe"),
        "must have no readinessProbe": lambda s: s["containers"].insert(0, {
            "name": "app", "image": "x/app:1",
            "securityContext": {"allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}}}),
        "initContainer": lambda s: s.update(initContainers=[{"name": "setup",
                                                             "image": "x/busybox"}]),
    }
    failures = []
    errors, pods = check_documents([yaml.safe_load(GOOD)], "good")
    if errors or pods != 1:
        failures.append(f"the good manifest failed: {errors} ({pods} pods)")
    for expect, fn in cases.items():
        errors, _ = check_documents([mutate(fn)], f"bad[{expect}]")
        if not any(expect in e for e in errors):
            failures.append(f"bad[{expect}] was not caught: {errors}")
    # A Job, a CronJob and a bare Pod are found too.
    job = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "j"},
           "spec": {"jobTemplate": {"spec": {"template": {"spec": {
               "containers": [{"name": "c", "image": "i",
                               "securityContext": {"privileged": True}}]}}}}}}
    errors, pods = check_documents([job], "cronjob")
    if pods != 1 or not any("privileged" in e for e in errors):
        failures.append(f"a privileged CronJob was not caught: {errors}")
    for failure in failures:
        print(f"pss_restricted self-test: FAIL: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"pss_restricted self-test: {len(cases) + 2} cases, every bad manifest caught")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    errors, pods = check_files(argv)
    for e in errors:
        print(f"restricted: FAIL: {e}", file=sys.stderr)
    if errors:
        print(f"restricted: {len(errors)} violation(s) in {pods} pod template(s)",
              file=sys.stderr)
        return 1
    if pods == 0:
        print(f"restricted: no pod template in {' '.join(argv)}", file=sys.stderr)
        return 1
    print(f"restricted: {pods} pod template(s) pass ({' '.join(argv)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
