"""A real OpenLDAP `slapd` for the LDAP login tests: its own config, database and ports under a temp
dir (never the system's slapd instance), LDAP and LDAPS (a TestCA certificate), seeded with `ldapadd`.

The directory holds people under ou=people (uid, cn, userPassword), a service account under
ou=services, and groupOfNames under ou=groups; the memberof overlay sets `memberOf` on members, so
both ways of reading groups (an attribute, a group search) work against it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.certs import TestCA
from tests.support.registry import free_port
from tests.support.waiting import wait_until_sync

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-secret"
SERVICE_DN = f"cn=edgecache,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"
PEOPLE = {"carol": "carol-ldap-pass", "dave": "dave-ldap-pass", "erin": "erin-ldap-pass"}
GROUPS = {"ops": ["carol"], "devs": ["dave", "carol"]}  # erin is in no group


@dataclass
class Slapd:
    directory: Path
    ca: TestCA
    port: int
    tls_port: int
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def start(self) -> Slapd:
        """Run slapd in the foreground (-d 0) on both ports; wait until it accepts connections."""
        with (self.directory / "slapd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "slapd",
                    "-d",
                    "0",
                    "-f",
                    str(self.directory / "slapd.conf"),
                    "-h",
                    f"{self.url}/ {self.tls_url}/",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_until_sync(self._accepts, message=f"slapd did not listen on {self.port}")
        return self

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.directory / "slapd.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"slapd exited with {self.proc.returncode}: {log}")
        for port in (self.port, self.tls_port):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def add(self, ldif: str) -> None:
        subprocess.run(
            ["ldapadd", "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
            input=ldif.encode(),
            check=True,
            capture_output=True,
            timeout=30,
        )


def start_slapd(directory: Path) -> Slapd:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "db").mkdir()
    ca = TestCA(directory / "pki", name="edgecache LDAP test CA")
    issued = ca.issue("ldap")
    (directory / "slapd.conf").write_text(
        f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
TLSCACertificateFile {ca.cert_path}
TLSCertificateFile {issued.cert}
TLSCertificateKeyFile {issued.key}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {directory}/db
overlay memberof
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
"""
    )
    slapd = Slapd(directory, ca, free_port(), free_port()).start()
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: example\ndc: example\n",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: edgecache\nuserPassword: {SERVICE_PASSWORD}\n",
    ]
    for user, password in PEOPLE.items():
        entries.append(
            f"dn: uid={user},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {user}\ncn: {user}\n"
            f"sn: {user}\nuserPassword: {password}\n"
        )
    for group, members in GROUPS.items():
        lines = "".join(f"member: uid={m},ou=people,{SUFFIX}\n" for m in members)
        entries.append(f"dn: cn={group},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: {group}\n{lines}")
    slapd.add("\n".join(entries))
    return slapd
