"""Offline checks of deploy/Containerfile and deploy/k8s/*.yaml (`make verify-k8s`).

1. Every Kubernetes object validates, strictly (unknown fields are errors), against the schemas
   that the pinned kubernetes-validate package carries, for the oldest Kubernetes the manifests
   support and the newest the package knows. An unknown kind is an error, not a warning.
2. The files agree with each other and with absorb: the Job's shard count is its completions,
   probes ask /healthz on the port absorb listens on (not loopback), the Service selects the serve
   pods, GPU pods ask for nvidia.com/gpu, the bundle, library and user match the Containerfile's.
3. Each check can fail: broken copies of the real files (an unknown field, a wrong shard count, a
   string port, a loopback listener, ...) must each be rejected with the expected message.
4. With ABSORB_BIN (an absorb binary; ORT_DYLIB_PATH as usual): the containers' own args run, with
   the repository's bundle for the image's, a temporary directory for the volume, a few images and
   the CPU provider: the Job's as its shard 1 from JOB_COMPLETION_INDEX, each `serve` until its
   /healthz answers 200, then SIGTERM, which must exit 0.

Run with the venv from scripts/k8s-requirements.txt: python scripts/verify-deploy.py
"""

import copy
import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request

import dockerfile
import yaml
from kubernetes_validate import utils as kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# backoffLimitPerIndex and podReplacementPolicy (batch-job.yaml) are on by default from 1.29.
K8S_VERSIONS = ["1.29", "1.37"]
CONTAINERFILE = os.path.join(ROOT, "deploy", "Containerfile")
INSTRUCTIONS = {"ARG", "FROM", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL", "RUN"}


class Invalid(Exception):
    pass


def load_manifests():
    """{file name: [object, ...]} for deploy/k8s/*.yaml."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml"))):
        with open(path) as f:
            out[os.path.basename(path)] = [d for d in yaml.safe_load_all(f) if d]
    return out


def load_containerfile():
    """The image's facts: copy destinations, environment, user, exposed ports, entrypoint."""
    image = {"copies": [], "env": {}, "user": None, "expose": [], "entrypoint": None}
    for c in dockerfile.parse_file(CONTAINERFILE):
        if c.cmd not in INSTRUCTIONS:
            raise Invalid(f"Containerfile line {c.start_line}: unknown instruction {c.cmd}")
        if c.cmd == "COPY":
            if len(c.value) < 2:
                raise Invalid(f"Containerfile line {c.start_line}: COPY needs a source and a destination")
            image["copies"].append(c.value[-1].rstrip("/"))
        elif c.cmd == "ENV":
            image["env"].update(dict(zip(c.value[::2], c.value[1::2])))
        elif c.cmd == "USER":
            image["user"] = c.value[0]
        elif c.cmd == "EXPOSE":
            image["expose"] += [int(p.split("/")[0]) for p in c.value]
        elif c.cmd == "ENTRYPOINT":
            image["entrypoint"] = list(c.value)
    return image


def check_image(image):
    lib = image["env"].get("ORT_DYLIB_PATH", "")
    if os.path.dirname(lib) not in image["copies"]:
        raise Invalid(f"Containerfile: ORT_DYLIB_PATH={lib} is not in a copied directory {image['copies']}")
    entry = (image["entrypoint"] or [""])[0]
    if entry not in image["copies"]:
        raise Invalid(f"Containerfile: the entrypoint {entry} is not copied into the image")
    if image["user"] in (None, "0", "root") or image["user"].startswith("0:"):
        raise Invalid("Containerfile: runs as root; set USER to an unprivileged id")


def validate_schema(name, obj):
    for version in K8S_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise Invalid(f"{name}: {obj.get('kind')} {path}: {e.message} (Kubernetes {version})")
        except kv.SchemaNotFoundError as e:
            raise Invalid(f"{name}: no schema: {e.message}")


def arg_after(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def check_container(name, c, image):
    args = c.get("args", [])
    model = arg_after(args, "--model")
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    if model and not any(model == d or model.startswith(d + "/") for d in image["copies"] + mounts):
        raise Invalid(f"{name}: --model {model} is neither baked into the image nor on a mounted volume")
    # --models DIR: bundles baked under it, or a volume at it (or above it).
    models = arg_after(args, "--models")
    if models and not (any(d.rstrip("/").startswith(models.rstrip("/") + "/") for d in image["copies"])
                       or any(models == d or models.startswith(d + "/") for d in mounts)):
        raise Invalid(f"{name}: --models {models} holds no bundle baked into the image and is not on a mounted volume")
    res = c.get("resources", {})
    if not res.get("requests") or not res.get("limits", {}).get("memory"):
        raise Invalid(f"{name}: container {c['name']} needs resource requests and a memory limit")
    gpu = arg_after(args, "--provider") in ("cuda", "tensorrt")
    if gpu != ("nvidia.com/gpu" in res.get("limits", {})):
        raise Invalid(f"{name}: a GPU provider and an nvidia.com/gpu limit go together (provider "
                      f"{arg_after(args, '--provider') or 'cpu'}, limits {res.get('limits')})")


def check_job(name, job, image):
    spec = job["spec"]
    if spec.get("completionMode") != "Indexed":
        raise Invalid(f"{name}: the Job must have completionMode Indexed (JOB_COMPLETION_INDEX is the shard)")
    completions = spec.get("completions")
    if spec.get("parallelism", 1) > completions:
        raise Invalid(f"{name}: parallelism above completions")
    for c in pod_spec(job)["containers"]:
        args = c.get("args", [])
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        shards = arg_after(args, "--shards") or env.get("ABSORB_SHARDS")
        if shards is None or int(shards) != completions:
            raise Invalid(f"{name}: ABSORB_SHARDS (or --shards) is {shards}, completions {completions}: they must be equal")
        if arg_after(args, "--seed") is None:
            raise Invalid(f"{name}: a sharded run needs --seed")
        out = arg_after(args, "--out") or ""
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        if not out.endswith("/") or not any(out.startswith(m.rstrip("/") + "/") for m in mounts):
            raise Invalid(f"{name}: --out {out} must be a directory (ending in /) on a mounted volume {mounts}")
        check_container(name, c, image)


def probe_port(c, probe):
    port = probe["httpGet"]["port"]
    for p in c.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    raise Invalid(f"probe port {port} is not a port of container {c['name']}")


def check_deployment(name, d, image):
    pod = pod_spec(d)
    labels = d["spec"]["template"]["metadata"]["labels"]
    selector = d["spec"]["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in selector.items()):
        raise Invalid(f"{name}: the selector {selector} does not match the pod labels {labels}")
    for c in pod["containers"]:
        args = c.get("args", [])
        if not args or args[0] != "serve":
            continue
        listen = arg_after(args, "--listen") or "127.0.0.1:8080"
        host, port = listen.rsplit(":", 1)
        if host in ("127.0.0.1", "localhost", "[::1]"):
            raise Invalid(f"{name}: --listen {listen} is loopback: probes and the Service cannot reach it")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe:
                raise Invalid(f"{name}: container {c['name']} has no {kind} (the startup probe covers warm-up)")
            if probe.get("httpGet", {}).get("path") != "/healthz":
                raise Invalid(f"{name}: {kind} must GET /healthz")
            if probe_port(c, probe) != int(port):
                raise Invalid(f"{name}: {kind} asks port {probe_port(c, probe)}, absorb listens on {port}")
        # SIGTERM comes after the preStop hook; absorb then drains for at most --drain-timeout-ms
        # (answering 503 to what is still waiting) and exits. The grace period must cover both
        # with room for the worker to stop, or Kubernetes kills the drain with SIGKILL.
        drain_s = int(arg_after(args, "--drain-timeout-ms") or 10000) / 1000
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_s = float(pre_stop[1]) if len(pre_stop) == 2 and pre_stop[0] == "sleep" else 0.0
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < pre_stop_s + drain_s + 5:
            raise Invalid(f"{name}: terminationGracePeriodSeconds {grace} must be at least the preStop sleep "
                          f"({pre_stop_s:g} s) + --drain-timeout-ms ({drain_s:g} s) + 5 s, or SIGKILL cuts the drain")
        if int(port) not in image["expose"]:
            raise Invalid(f"{name}: port {port} is not EXPOSEd by the Containerfile {image['expose']}")
        check_container(name, c, image)
    user = pod.get("securityContext", {}).get("runAsUser")
    if user is not None and str(user) != image["user"].split(":")[0]:
        raise Invalid(f"{name}: runAsUser {user}, the image's USER {image['user']}")


def check_service(name, svc, deployments):
    sel = svc["spec"]["selector"]
    pods = [d for d in deployments if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    if not pods:
        raise Invalid(f"{name}: Service {svc['metadata']['name']} selects no pods of these Deployments")
    for p in svc["spec"]["ports"]:
        for d in pods:
            names = [q.get("name") for c in pod_spec(d)["containers"] for q in c.get("ports", [])]
            if p["targetPort"] not in names:
                raise Invalid(f"{name}: Service targetPort {p['targetPort']} is not a port of {d['metadata']['name']}")


def check_all(manifests, image):
    check_image(image)
    deployments = [o for objs in manifests.values() for o in objs if o["kind"] == "Deployment"]
    for name, objs in manifests.items():
        for obj in objs:
            validate_schema(name, obj)
            if obj["kind"] == "Job":
                check_job(name, obj, image)
            elif obj["kind"] == "Deployment":
                check_deployment(name, obj, image)
            elif obj["kind"] == "Service":
                check_service(name, obj, deployments)


def find(manifests, kind, file):
    return next(o for o in manifests[file] if o["kind"] == kind)


def container(obj):
    return pod_spec(obj)["containers"][0]


def set_arg(obj, flag, value):
    args = container(obj)["args"]
    args[args.index(flag) + 1] = value


# Broken copies of the real files: (what is broken, change, words the rejection must contain).
def _unknown_field(m, i):
    spec = find(m, "Job", "batch-job.yaml")["spec"]
    spec["completionsMode"] = spec.pop("completionMode")


def _wrong_shards(m, i):
    container(find(m, "Job", "batch-job.yaml"))["env"][0]["value"] = "4"


def _string_port(m, i):
    container(find(m, "Deployment", "serve.yaml"))["ports"][0]["containerPort"] = "8080"


def _unknown_kind(m, i):
    find(m, "Job", "batch-job.yaml")["kind"] = "Jobs"


def _loopback(m, i):
    set_arg(find(m, "Deployment", "serve.yaml"), "--listen", "127.0.0.1:8080")


def _no_startup_probe(m, i):
    del container(find(m, "Deployment", "serve.yaml"))["startupProbe"]


def _probe_path(m, i):
    container(find(m, "Deployment", "serve-gpu.yaml"))["livenessProbe"]["httpGet"]["path"] = "/health"


def _service_selector(m, i):
    find(m, "Service", "serve.yaml")["spec"]["selector"]["app.kubernetes.io/component"] = "server"


def _no_gpu(m, i):
    del container(find(m, "Deployment", "serve-gpu.yaml"))["resources"]["limits"]["nvidia.com/gpu"]


def _ort_path(m, i):
    i["env"]["ORT_DYLIB_PATH"] = "/usr/lib/libonnxruntime.so"


def _short_grace(m, i):
    pod_spec(find(m, "Deployment", "serve.yaml"))["terminationGracePeriodSeconds"] = 12


def _model_path(m, i):
    set_arg(find(m, "Job", "batch-job.yaml"), "--model", "/models/digits")


BROKEN = [
    ("a misspelt field", _unknown_field, "Additional properties are not allowed ('completionsMode' was unexpected)"),
    ("a shard count that is not completions", _wrong_shards, "ABSORB_SHARDS (or --shards) is 4, completions 3"),
    ("a port given as a string", _string_port, "'8080' is not of type 'integer'"),
    ("an unknown kind", _unknown_kind, "no schema"),
    ("a loopback listener", _loopback, "is loopback"),
    ("no startup probe", _no_startup_probe, "has no startupProbe"),
    ("a probe on another path", _probe_path, "livenessProbe must GET /healthz"),
    ("a Service that selects nothing", _service_selector, "selects no pods"),
    ("a GPU provider without a GPU", _no_gpu, "nvidia.com/gpu limit go together"),
    ("ONNX Runtime outside the image's copies", _ort_path, "ORT_DYLIB_PATH=/usr/lib/libonnxruntime.so"),
    ("a bundle path the image lacks", _model_path, "--model /models/digits is neither baked"),
    ("a grace period shorter than the drain", _short_grace, "terminationGracePeriodSeconds 12 must be at least"),
]


def run_job(bin_path, name, job, tmp):
    """Runs the Job's container args as its shard 1, on a few images at 2 steps."""
    c = container(job)
    args = list(c["args"])
    out = os.path.join(tmp, "job") + "/"
    for flag, value in (("--model", os.path.join(ROOT, "models", "digits")), ("--out", out), ("--count", "6")):
        args[args.index(flag) + 1] = value
    env = dict(os.environ, JOB_COMPLETION_INDEX="1")
    env.update({e["name"]: e["value"] for e in c.get("env", [])})
    shards = int(env["ABSORB_SHARDS"])
    p = subprocess.run([bin_path, *args, "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise Invalid(f"{name}: the Job's args fail: exit {p.returncode}: {p.stderr.strip()}")
    made = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    first, last = 6 * 1 // shards, 6 * 2 // shards
    seed = arg_after(args, "--seed")
    if made != [f"{seed}-{i:06}.png" for i in range(first, last)]:
        raise Invalid(f"{name}: shard 1 of {shards} made {made}")


def run_serve(bin_path, name, d):
    """Starts each serve container's args on the CPU and asks /healthz, then stops it."""
    c = container(d)
    args = list(c["args"])
    if "--model" in args:
        args[args.index("--model") + 1] = os.path.join(ROOT, "models", "digits")
    if "--models" in args:
        args[args.index("--models") + 1] = os.path.join(ROOT, "models")
    args[args.index("--listen") + 1] = "127.0.0.1:0"
    if "--provider" in args:
        args[args.index("--provider") + 1] = "cpu"
    p = subprocess.Popen([bin_path, *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    timer = threading.Timer(120, p.kill)
    timer.start()
    try:
        addr, lines = None, []
        for line in p.stderr:
            lines.append(line)
            if line.startswith("listening on "):
                addr = line.split()[-1]
                break
        if addr is None:
            raise Invalid(f"{name}: serve with the Deployment's args did not start: {''.join(lines).strip()}")
        path = c["livenessProbe"]["httpGet"]["path"]
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
            if r.status != 200:
                raise Invalid(f"{name}: GET {path} answered {r.status}")
        p.send_signal(signal.SIGTERM)
        p.stderr.read()
        if p.wait() != 0:
            raise Invalid(f"{name}: serve exited {p.returncode} on SIGTERM")
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()


def run_args(manifests, bin_path):
    with tempfile.TemporaryDirectory() as tmp:
        for name, objs in manifests.items():
            for obj in objs:
                if obj["kind"] == "Job":
                    run_job(bin_path, name, obj, tmp)
                elif obj["kind"] == "Deployment":
                    run_serve(bin_path, name, obj)


def main():
    manifests = load_manifests()
    image = load_containerfile()
    try:
        check_all(manifests, image)
    except Invalid as e:
        print(f"verify-k8s: FAILED: {e}")
        return 1
    objects = sum(len(v) for v in manifests.values())
    print(f"verify-k8s: {objects} objects in {len(manifests)} files valid against Kubernetes "
          f"{' and '.join(K8S_VERSIONS)} (kubernetes-validate, strict) and consistent with deploy/Containerfile")
    failed = 0
    for what, change, words in BROKEN:
        m, i = copy.deepcopy(manifests), copy.deepcopy(image)
        change(m, i)
        try:
            check_all(m, i)
            print(f"verify-k8s: FAILED: {what} was accepted")
            failed += 1
        except Invalid as e:
            if words not in str(e):
                print(f"verify-k8s: FAILED: {what} was rejected for another reason: {e}")
                failed += 1
    print(f"verify-k8s: {len(BROKEN) - failed} of {len(BROKEN)} deliberately broken copies rejected")
    bin_path = os.environ.get("ABSORB_BIN")
    if not bin_path:
        print("verify-k8s: the containers' args were not run (set ABSORB_BIN to an absorb binary)")
    else:
        try:
            run_args(manifests, bin_path)
            print(f"verify-k8s: the containers' args run with {bin_path}: the Job's shard 1 made its images, "
                  "each serve answered /healthz and stopped on SIGTERM")
        except (Invalid, OSError, subprocess.SubprocessError) as e:
            print(f"verify-k8s: FAILED: {e}")
            failed += 1
        # And that run can fail: a misspelt flag in the Job's args.
        m = copy.deepcopy(manifests)
        args = container(find(m, "Job", "batch-job.yaml"))["args"]
        args[args.index("--max-batch")] = "--max_batch"
        try:
            run_args({"batch-job.yaml": m["batch-job.yaml"]}, bin_path)
            print("verify-k8s: FAILED: a Job with a misspelt flag ran")
            failed += 1
        except Invalid as e:
            if "the Job's args fail: exit 2" not in str(e):
                print(f"verify-k8s: FAILED: a misspelt flag failed for another reason: {e}")
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
