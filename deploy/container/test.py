#!/usr/bin/env python3
"""The poolrelay image against real peers (run by `make test-container`).

1. One container, its config and admin token mounted, SMTP and admin
   published on 127.0.0.1 (free ports), read-only root filesystem, no
   capabilities; its upstream is `poolrelay sink` on the host, reached at
   the gateway address of a Docker network made for the test. A message
   sent with smtplib arrives; /metrics counts it; the process runs as uid
   65532; the image's HEALTHCHECK (`poolrelay health`) says healthy; logs
   are JSON lines.
2. Persistence: with the sink stopped, 20 messages are queued; `docker
   stop` ends the container well within the grace period with exit code 0;
   the container is removed; a new one on the same volume, with the sink
   back, delivers all 20, each once.
3. A real Prometheus (the host's, Debian's `prometheus`) scrapes the
   container with deploy/prometheus/prometheus.yml and its rules, a query
   returns poolrelay's series, and PoolrelayUpstreamDown goes pending when
   the sink stops (a test copy of the rules with a short `for:`).
4. The compose stack: `docker-compose config` accepts it; `up` of the relay
   and the two sinks (Prometheus and Grafana skipped by compose.test.yaml:
   their images cannot be pulled here) delivers a message per lane.
5. `kubectl kustomize deploy/kubernetes` renders, `kubernetes-validate
   --strict` accepts every object it knows, and the ConfigMap's config
   passes `poolrelay check`.

Every container, volume and network is named after this process and removed
at the end, also on failure or Ctrl-C. Parts whose tools are missing are
skipped with a line saying so; POOLRELAY_CONTAINER_REQUIRE=1 turns a skip
into a failure. Environment: POOLRELAY_IMAGE (default poolrelay:VERSION),
POOLRELAY_BIN (a poolrelay binary for the host-side sink and checks).
"""

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = f"poolrelay-ctest-{os.getpid()}"
REQUIRE = os.environ.get("POOLRELAY_CONTAINER_REQUIRE") == "1"
T0 = time.monotonic()


def version():
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return m.group(1)


IMAGE = os.environ.get("POOLRELAY_IMAGE", f"poolrelay:{version()}")


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    for p in ("x86_64-unknown-linux-gnu/release/poolrelay", "release/poolrelay", "debug/poolrelay"):
        path = os.path.join(target, p)
        if os.access(path, os.X_OK):
            return path
    sys.exit("no poolrelay binary: build it (make image) or set POOLRELAY_BIN")


BIN = os.environ.get("POOLRELAY_BIN") or default_bin()


def log(msg):
    print(f"[container-test {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def skip(msg):
    if REQUIRE:
        raise Failed(f"required but skipped: {msg}")
    log(f"SKIPPED: {msg}")


def run(args, timeout=120, check_rc=True, **kw):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check_rc and p.returncode != 0:
        raise Failed(f"{' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def docker(*args, **kw):
    return run(["docker", *args], **kw)


def wait_until(what, fn, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise Failed(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def metric_sum(text, name):
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


# ---------------------------------------------------------------- cleanup

CONTAINERS, VOLUMES, NETWORKS, PROCS, COMPOSE, TEMP_DIRS = [], [], [], [], [], []


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    for args in COMPOSE:
        subprocess.run(args + ["down", "-v", "--remove-orphans", "-t", "5"], capture_output=True, timeout=120)
    for c in CONTAINERS:
        subprocess.run(["docker", "rm", "-f", "-v", c], capture_output=True, timeout=60)
    for v in VOLUMES:
        subprocess.run(["docker", "volume", "rm", "-f", v], capture_output=True, timeout=60)
    for n in NETWORKS:
        subprocess.run(["docker", "network", "rm", n], capture_output=True, timeout=60)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- pieces


class Sink:
    """`poolrelay sink` on the host, one file per message in a directory."""

    def __init__(self, listen, directory):
        self.listen, self.dir, self.proc = listen, directory, None

    def start(self):
        self.proc = subprocess.Popen(
            [BIN, "sink", "--listen", self.listen, "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        PROCS.append(self.proc)
        host, port = self.listen.rsplit(":", 1)

        def up():
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(f"the sink on {self.listen}", up, 10)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def messages(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name), errors="replace") as f:
                out.append(f.read())
        return out

    def count(self, marker):
        return sum(marker in m for m in self.messages())


def send(port, subject, sender="owner-list@lists.example.org"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, ["someone@example.com"], f"Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\n{subject}\r\n")


def relay_config(upstream, admin_token=True):
    admin = 'token_file = "/run/secrets/poolrelay/admin-token"' if admin_token else "allow_unauthenticated = true"
    return f"""[server]
hostname = "relay.ctest.localhost"
spool_dir = "/var/spool/poolrelay"

[[listener]]
name = "main"
address = "0.0.0.0:2525"
relay_from = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]

[admin]
address = "0.0.0.0:9025"
{admin}

[defaults]
retry = ["1s", "2s", "5s"]
max_age = "1h"

[pool."-"]

[[upstream]]
host = "{upstream}"
workers = 2
connect_timeout = "2s"
"""


class Relay:
    def __init__(self, name, network, volume, confdir):
        self.name, self.network, self.volume, self.confdir = name, network, volume, confdir
        self.smtp, self.admin = free_port(), free_port()

    def start(self):
        CONTAINERS.append(self.name)
        docker(
            "run", "-d", "--name", self.name, "--network", self.network,
            "-p", f"127.0.0.1:{self.smtp}:2525", "-p", f"127.0.0.1:{self.admin}:9025",
            "-v", f"{self.confdir}/poolrelay.toml:/etc/poolrelay/poolrelay.toml:ro",
            "-v", f"{self.confdir}/admin-token:/run/secrets/poolrelay/admin-token:ro",
            "-v", f"{self.volume}:/var/spool/poolrelay",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--stop-timeout", "30", "--health-interval", "2s", "--health-start-period", "2s",
            IMAGE,
        )
        wait_until(f"{self.name} healthy", lambda: self.health() == "healthy" or self.exited(), 60)
        check(not self.exited(), f"{self.name} exited:\n{self.logs()}")

    def health(self):
        return docker("inspect", "-f", "{{.State.Health.Status}}", self.name, check_rc=False).stdout.strip()

    def exited(self):
        return docker("inspect", "-f", "{{.State.Status}}", self.name, check_rc=False).stdout.strip() == "exited"

    def logs(self):
        p = docker("logs", self.name, check_rc=False)
        return p.stdout + p.stderr

    def metrics(self):
        status, text = http_get(f"http://127.0.0.1:{self.admin}/metrics")
        check(status == 200, f"/metrics answered {status}")
        return text


# ---------------------------------------------------------------- tests


def test_image():
    inspect = json.loads(docker("image", "inspect", IMAGE).stdout)[0]
    cfg = inspect["Config"]
    size = inspect["Size"]
    log(f"image {IMAGE}: {size} bytes ({size / 1e6:.1f} MB)")
    check(cfg["User"] == "65532:65532", f"image user is {cfg['User']!r}")
    check("/var/spool/poolrelay" in (cfg.get("Volumes") or {}), "no VOLUME /var/spool/poolrelay")
    check(cfg["Healthcheck"]["Test"] == ["CMD", "/usr/local/bin/poolrelay", "health"], f"healthcheck {cfg['Healthcheck']}")
    labels = cfg.get("Labels") or {}
    check(labels.get("org.opencontainers.image.version") == version(), f"labels {labels}")
    check(labels.get("org.opencontainers.image.licenses"), "no licences label")
    check(size < 20_000_000, f"image is {size} bytes, over 20 MB")
    # The config baked in is valid, and the relay does not start without its admin token.
    docker("run", "--rm", IMAGE, "check")
    p = docker("run", "--rm", IMAGE, check_rc=False, timeout=60)
    check(p.returncode != 0 and "admin-token" in p.stderr, f"default config without a token: {p.returncode} {p.stderr}")
    log(f"the baked-in config passes `check`; without a token `run` exits {p.returncode}: {p.stderr.strip()[-160:]}")


def test_relay(net_gateway, network, confdir, volume):
    sink_port = free_port()
    sink_dir = tempfile.mkdtemp(prefix=PREFIX + "-sink-")
    TEMP_DIRS.append(sink_dir)
    sink = Sink(f"{net_gateway}:{sink_port}", sink_dir)
    sink.start()
    with open(os.path.join(confdir, "poolrelay.toml"), "w") as f:
        f.write(relay_config(f"{net_gateway}:{sink_port}"))
    os.chmod(os.path.join(confdir, "poolrelay.toml"), 0o644)

    relay = Relay(f"{PREFIX}-a", network, volume, confdir)
    relay.start()
    log(f"{relay.name} healthy (image HEALTHCHECK: poolrelay health); SMTP 127.0.0.1:{relay.smtp}, admin 127.0.0.1:{relay.admin}")

    pid = docker("inspect", "-f", "{{.State.Pid}}", relay.name).stdout.strip()
    with open(f"/proc/{pid}/status") as f:
        uids = [line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))]
    check(all(u == "65532" for ids in uids for u in ids), f"process ids {uids}")
    log(f"PID 1 of the container (host pid {pid}) runs as uid/gid 65532")
    p = docker("exec", relay.name, "/usr/local/bin/poolrelay", "health", check_rc=False)
    check(p.returncode == 0, f"poolrelay health in the container: {p.returncode} {p.stdout} {p.stderr}")

    marker = f"first-{uuid.uuid4().hex}"
    send(relay.smtp, marker)
    wait_until("the first message at the sink", lambda: sink.count(marker) >= 1, 30)
    wait_until("/metrics counting it",
               lambda: (metric_sum(relay.metrics(), "poolrelay_received_messages_total") or 0) >= 1
               and (metric_sum(relay.metrics(), "poolrelay_delivered_recipients_total") or 0) >= 1, 15)
    log("a message sent with smtplib arrived at the host sink; /metrics counts it received and delivered")
    # The queue CLI inside the container, with the mounted token.
    p = docker("exec", relay.name, "/usr/local/bin/poolrelay", "queue", "summary", "--json")
    check(json.loads(p.stdout) is not None, "queue summary")
    if shutil.which("prometheus") and shutil.which("promtool"):
        test_prometheus(relay, sink)
    else:
        skip("Prometheus: no prometheus/promtool on this host (apt-get install prometheus)")

    # Persistence.
    sink.stop()
    markers = [f"persist-{i:02d}-{uuid.uuid4().hex}" for i in range(20)]
    for m in markers:
        send(relay.smtp, m)
    wait_until("20 messages queued", lambda: metric_sum(relay.metrics(), "poolrelay_queue_messages") == 20, 15)
    log("sink stopped: 20 messages accepted and queued")
    t = time.monotonic()
    docker("stop", relay.name, timeout=60)
    stop_s = time.monotonic() - t
    code = docker("inspect", "-f", "{{.State.ExitCode}}", relay.name).stdout.strip()
    oom = docker("inspect", "-f", "{{.State.OOMKilled}}", relay.name).stdout.strip()
    check(code == "0", f"exit code {code} after docker stop:\n{relay.logs()[-3000:]}")
    check(stop_s < 15, f"docker stop took {stop_s:.1f}s (grace 30s, relay drains up to 20s)")
    log(f"docker stop: {stop_s:.2f}s (stop timeout 30s), exit code {code}, OOMKilled {oom}")
    logs = relay.logs().strip().splitlines()
    records = [json.loads(line) for line in logs]
    check(any("SIGTERM" in json.dumps(r) for r in records), "no SIGTERM log line")
    log(f"{len(records)} log lines, every one JSON; the relay logged SIGTERM")
    docker("rm", relay.name)

    sink.start()
    relay_b = Relay(f"{PREFIX}-b", network, volume, confdir)
    relay_b.start()
    log(f"{relay_b.name} started on the same volume with the sink back")
    wait_until("all 20 at the sink", lambda: all(sink.count(m) >= 1 for m in markers), 60)
    time.sleep(3)
    counts = {m: sink.count(m) for m in markers}
    check(all(c == 1 for c in counts.values()), f"copies per message: {counts}")
    wait_until("an empty queue", lambda: metric_sum(relay_b.metrics(), "poolrelay_queue_messages") == 0, 15)
    log("all 20 arrived, each once; the queue is empty")
    docker("stop", relay_b.name, timeout=60)
    sink.stop()


def test_prometheus(relay, sink):
    """The host's Prometheus scrapes the container with deploy/prometheus's files."""
    work = tempfile.mkdtemp(prefix=PREFIX + "-prom-")
    TEMP_DIRS.append(work)
    with open(os.path.join(ROOT, "deploy/prometheus/prometheus.yml")) as f:
        conf = f.read()
    check("127.0.0.1:9025" in conf, "deploy/prometheus/prometheus.yml no longer targets 127.0.0.1:9025")
    conf = conf.replace("127.0.0.1:9025", f"127.0.0.1:{relay.admin}")
    conf = re.sub(r"scrape_interval: \S+", "scrape_interval: 1s", conf)
    conf = re.sub(r"evaluation_interval: \S+", "evaluation_interval: 1s", conf)
    with open(os.path.join(ROOT, "deploy/prometheus/alerts.yml")) as f:
        rules = f.read()
    # A test copy of the rules: every `for:` 2s, so pending/firing show within seconds.
    rules = re.sub(r"(\n\s+for: )\S+", r"\g<1>2s", rules)
    with open(os.path.join(work, "prometheus.yml"), "w") as f:
        f.write(conf)
    with open(os.path.join(work, "alerts.yml"), "w") as f:
        f.write(rules)
    run(["promtool", "check", "config", os.path.join(work, "prometheus.yml")])
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/data",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w"),
    )
    PROCS.append(proc)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(q):
        status, body = http_get(f"{api}/query?query={urllib.parse.quote(q)}")
        return json.loads(body)["data"]["result"] if status == 200 else []

    wait_until("Prometheus scraping poolrelay",
               lambda: query('poolrelay_received_messages_total{job="poolrelay"}'), 30, 0.5)
    up = query('up{job="poolrelay"}')
    check(up and up[0]["value"][1] == "1", f"up: {up}")
    series = query('{job="poolrelay",__name__=~"poolrelay_.+"}')
    check(series, "no poolrelay_ series in Prometheus")
    log(f"Prometheus (host, deploy/prometheus/prometheus.yml) scrapes the container: {len(series)} poolrelay series, up=1")
    sink.stop()
    # The upstream is only found down when the relay tries it: send one.
    send(relay.smtp, f"probe-{uuid.uuid4().hex}")

    def alert():
        status, body = http_get(f"{api}/alerts")
        found = [a for a in json.loads(body)["data"]["alerts"] if a["labels"]["alertname"] == "PoolrelayUpstreamDown"] if status == 200 else []
        return found[0]["state"] if found else None

    state = wait_until("PoolrelayUpstreamDown pending or firing", alert, 30, 0.5)
    log(f"sink stopped: PoolrelayUpstreamDown is {state}")
    proc.terminate()
    proc.wait(10)
    sink.start()
    # The probe message goes out once the sink is back; the persistence test wants it gone first.
    wait_until("the probe delivered", lambda: metric_sum(relay.metrics(), "poolrelay_queue_messages") == 0, 30)


def test_compose():
    compose = None
    if shutil.which("docker-compose"):
        compose = ["docker-compose"]
    elif docker("compose", "version", check_rc=False).returncode == 0:
        compose = ["docker", "compose"]
    if not compose:
        skip("compose: neither `docker compose` nor docker-compose is installed")
        return
    d = os.path.join(ROOT, "deploy/compose")
    base = compose + ["-f", f"{d}/compose.yaml"]
    run(base + ["config", "-q"])
    log(f"`{' '.join(compose)} config` accepts deploy/compose/compose.yaml")
    args = base + ["-f", f"{d}/compose.test.yaml", "-p", PREFIX]
    smtp, emergency, admin = free_port(), free_port(), free_port()
    env = dict(os.environ, POOLRELAY_IMAGE=IMAGE, POOLRELAY_SMTP_PORT=str(smtp),
               POOLRELAY_EMERGENCY_PORT=str(emergency), POOLRELAY_ADMIN_PORT=str(admin))
    services = run(args + ["config", "--services"], env=env).stdout.split()
    COMPOSE.append(args)
    log("compose: prometheus and grafana SKIPPED (compose.test.yaml puts them in an unused profile: "
        "prom/prometheus and grafana/grafana cannot be pulled here)")
    run(args + ["up", "-d"], env=env, timeout=180)
    up = run(args + ["ps", "--services", "--filter", "status=running"], env=env).stdout.split()
    check({"poolrelay", "sink-bulk", "sink-emergency"} <= set(up), f"running: {up} of {services}")
    wait_until("the compose relay ready", lambda: http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, 60)
    bulk, urgent = f"bulk-{uuid.uuid4().hex}", f"urgent-{uuid.uuid4().hex}"
    send(smtp, bulk, sender="owner-biglist@lists.example.org")
    send(emergency, urgent, sender="someone@lists.example.org")

    def logs(service):
        return run(args + ["logs", "--no-color", service], env=env).stdout

    # The sinks print one line per message: `from=<sender> to=<...>`.
    wait_until("each lane at its sink",
               lambda: "from=<owner-biglist@lists.example.org>" in logs("sink-bulk")
               and "from=<someone@lists.example.org>" in logs("sink-emergency"), 30, 0.5)
    check("from=<someone@" not in logs("sink-bulk") and "from=<owner-biglist@" not in logs("sink-emergency"),
          "a message took the wrong lane")
    log(f"compose: `up` of {sorted(up)}: one message through each lane arrived at its sink")
    t = time.monotonic()
    run(args + ["down", "-v", "-t", "30"], env=env, timeout=120)
    log(f"compose: `down -v` in {time.monotonic() - t:.1f}s")
    COMPOSE.remove(args)


def test_kubernetes(bin_check):
    if not shutil.which("kubectl"):
        skip("kubernetes: no kubectl (apt-get install kubernetes-client)")
        return
    out = run(["kubectl", "kustomize", os.path.join(ROOT, "deploy/kubernetes")]).stdout
    docs = [d for d in out.split("\n---\n") if d.strip()]
    kinds = re.findall(r"^kind: (\S+)", out, re.M)
    log(f"kubectl kustomize deploy/kubernetes: {len(docs)} objects: {', '.join(kinds)}")
    work = tempfile.mkdtemp(prefix=PREFIX + "-k8s-")
    TEMP_DIRS.append(work)
    rendered = os.path.join(work, "rendered.yaml")
    with open(rendered, "w") as f:
        f.write(out)
    validator = shutil.which("kubernetes-validate")
    if validator:
        p = run([validator, "--strict", rendered], check_rc=False)
        text = p.stdout + p.stderr
        bad = [line for line in text.splitlines() if line.startswith("ERROR") or "INVALID" in line]
        check(p.returncode == 0 and not bad, f"kubernetes-validate --strict:\n{text}")
        passed = sum("passed for resource" in line for line in text.splitlines())
        unknown = re.findall(r"Couldn't find schema for kind (\S+)", text)
        log(f"kubernetes-validate --strict: {passed} objects pass; no schema offline for {', '.join(unknown) or 'none'}")
    else:
        skip("kubernetes: no kubernetes-validate (pip install kubernetes-validate)")
    import yaml  # python3-yaml; kubernetes-validate needs it too

    objects = [d for d in yaml.safe_load_all(out) if d]
    # The PrometheusRule holds deploy/prometheus/alerts.yml, and promtool accepts it.
    rule = [d for d in objects if d["kind"] == "PrometheusRule"][0]
    with open(os.path.join(ROOT, "deploy/prometheus/alerts.yml")) as f:
        check(rule["spec"] == yaml.safe_load(f), "PrometheusRule differs from deploy/prometheus/alerts.yml: regenerate it")
    if shutil.which("promtool"):
        rules = os.path.join(work, "rules.yml")
        with open(rules, "w") as f:
            yaml.safe_dump(rule["spec"], f)
        run(["promtool", "check", "rules", rules])
        log("the PrometheusRule's groups equal deploy/prometheus/alerts.yml and pass promtool check rules")
    # The ConfigMap's config passes `poolrelay check` (with a token file where it names one).
    cm = [d for d in objects if d["kind"] == "ConfigMap"][0]
    conf = cm["data"]["poolrelay.toml"]
    token = os.path.join(work, "admin-token")
    with open(token, "w") as f:
        f.write("t" * 32)
    os.chmod(token, 0o600)
    conf = conf.replace("/run/secrets/poolrelay/admin-token", token)
    conf = re.sub(r'spool_dir = "[^"]*"', f'spool_dir = "{work}/spool"', conf)
    path = os.path.join(work, "poolrelay.toml")
    with open(path, "w") as f:
        f.write(conf)
    run([bin_check, "check", "-c", path])
    log("the rendered ConfigMap's poolrelay.toml passes `poolrelay check`")


def main():
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    check(docker("info", check_rc=False).returncode == 0, "no Docker engine (docker info fails)")
    ok = False
    try:
        test_image()
        network, volume = f"{PREFIX}-net", f"{PREFIX}-spool"
        NETWORKS.append(network)
        VOLUMES.append(volume)
        docker("network", "create", network)
        gateway = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network).stdout.strip()
        log(f"network {network}: the relay reaches the host sink at its gateway {gateway}")
        docker("volume", "create", volume)
        confdir = tempfile.mkdtemp(prefix=PREFIX + "-conf-")
        TEMP_DIRS.append(confdir)
        os.chmod(confdir, 0o755)
        token = os.path.join(confdir, "admin-token")
        with open(token, "w") as f:
            f.write(uuid.uuid4().hex)
        os.chmod(token, 0o400)
        if os.geteuid() == 0:
            os.chown(token, 65532, 65532)
        else:
            run(["sudo", "chown", "65532:65532", token])
        test_relay(gateway, network, confdir, volume)
        test_compose()
        test_kubernetes(BIN)
        ok = True
    finally:
        cleanup()
        for d in TEMP_DIRS:
            shutil.rmtree(d, ignore_errors=True)
        log("cleaned up containers, volumes, networks" + ("" if ok else " (after a failure)"))
    log("container tests passed")


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        log(f"FAILED: {e}")
        sys.exit(1)
