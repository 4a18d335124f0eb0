"""A throwaway single-node Ceph cluster with a RADOS Gateway (S3 API), for the shared tier's tests.

One monitor, one OSD on memstore (objects in RAM), one radosgw, authentication off, everything under
one short temp dir on 127.0.0.1 (steps and settings: /work/shared/docs/ceph-rgw.md). Ready in about a
second; torn down with SIGKILL (nothing is worth keeping). Daemons run with `-f` and their output in
files, so the recorded PIDs are theirs and no pipe keeps a caller waiting.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.registry import free_port
from tests.support.waiting import wait_until_sync

ACCESS_KEY = "edgecachetest"
SECRET_KEY = "edgecachetestsecret0123456789abcdef"


def _conf(root: Path, mon_port: int, rgw_port: int) -> str:
    return f"""[global]
fsid = {uuid.uuid4()}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {root}/run
log file = {root}/log/$name.log
mon cluster log file = {root}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true

[mon]
mon data = {root}/mon/$id
paxos propose interval = 0.01

[osd]
osd data = {root}/osd/$id
osd objectstore = memstore
memstore device bytes = 1073741824

[client.rgw.a]
ms mon client mode = crc
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {root}/rgw
rgw gc obj min wait = 0
rgw gc processor period = 10
"""


@dataclass
class Ceph:
    """A running cluster: `endpoint` is the radosgw's S3 URL (path-style, no TLS)."""

    root: Path
    endpoint: str
    rgw_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def _spawn(self, name: str, *args: str) -> None:
        out = (self.root / "log" / f"{name}.out").open("ab")
        self.procs[name] = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        out.close()

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            list(args), capture_output=True, stdin=subprocess.DEVNULL, timeout=60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return done.stdout.decode()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def start_rgw(self) -> None:
        """Start (or restart) the gateway and wait until it answers."""
        self._spawn("rgw", "radosgw", "-c", str(self.conf), "-n", "client.rgw.a", "-f")
        wait_until_sync(self.answers, timeout=60, message="radosgw did not answer")

    def stop_rgw(self) -> None:
        """Kill the gateway (the cluster stays): the tier's endpoint refuses connections."""
        proc = self.procs.pop("rgw")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def create_bucket(self, name: str) -> None:
        """PUT /<bucket> with curl's SigV4 (obstore has no bucket API; bookworm's curl needs the
        payload hash header or it gets 403)."""
        self._run(
            "curl", "-sf", "-X", "PUT", "--aws-sigv4", "aws:amz:us-east-1:s3",
            "--user", f"{ACCESS_KEY}:{SECRET_KEY}", "-H", "x-amz-content-sha256:UNSIGNED-PAYLOAD",
            f"{self.endpoint}/{name}",
        )  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


def start_ceph() -> Ceph:
    """Bring up mon, osd and rgw; create the test user. The path stays short (radosgw skips its
    admin socket under a long one)."""
    root = Path(tempfile.mkdtemp(prefix="ec", dir="/tmp"))
    for sub in ("run", "log", "mon/a", "osd/0", "rgw"):
        (root / sub).mkdir(parents=True)
    mon_port, rgw_port = free_port(), free_port()
    ceph = Ceph(root, f"http://127.0.0.1:{rgw_port}", rgw_port)
    ceph.conf.write_text(_conf(root, mon_port, rgw_port))
    conf = str(ceph.conf)
    try:
        fsid = next(
            line.split("=", 1)[1].strip() for line in ceph.conf.read_text().splitlines() if "fsid" in line
        )
        monmap = str(root / "monmap")
        ceph._run(
            "monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", monmap
        )
        ceph._run("ceph-mon", "-c", conf, "-i", "a", "--mkfs", "--monmap", monmap)
        ceph._spawn("mon", "ceph-mon", "-c", conf, "-i", "a", "-f")
        osd_uuid = str(uuid.uuid4())
        ceph._run("ceph", "-c", conf, "osd", "new", osd_uuid)
        ceph._run("ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        ceph._spawn("osd", "ceph-osd", "-c", conf, "-i", "0", "-f")
        ceph.start_rgw()
        ceph._run(
            "radosgw-admin", "-c", conf, "user", "create", "--uid=test", "--display-name=test",
            f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}",
        )  # fmt: skip
    except BaseException:
        ceph.stop()
        raise
    return ceph


def available() -> bool:
    return all(shutil.which(tool) for tool in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin"))


def env_credentials() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


__all__ = ["ACCESS_KEY", "SECRET_KEY", "Ceph", "available", "env_credentials", "start_ceph"]
