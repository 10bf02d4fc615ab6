"""A Kafka broker with SASL/SCRAM over TLS and a redis-server with an ACL user over TLS, for
the tests that check freshrec's credentials and certificates against real servers.

The certificates are made here with the openssl command line, in the test's temporary folder:
a CA, a server certificate for 127.0.0.1 and a client certificate (Redis asks for one). The
broker runs from the same jars as the local broker freshrec starts; its SCRAM users are created
when its storage is formatted, as a KRaft cluster's first users are.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from freshrec.devenv.local_services import _kafka_lib, _port_open
from freshrec.settings import Settings
from tests.support import free_port

BROKER_ADMIN = ("admin", "admin-secret-7f3a")  # the broker's own inter-broker user


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    server_keystore: Path  # key and certificate in one PEM file, as Kafka reads them


def make_certificates(folder: Path) -> Certificates:
    """A throwaway CA and a server and a client certificate it signed, valid for a day."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command line is needed to make test certificates"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=freshrec test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (folder / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"
        )
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
            "-extfile", f"{name}.ext")  # fmt: skip
    keystore = folder / "server-keystore.pem"
    keystore.write_text((folder / "server.key").read_text() + (folder / "server.pem").read_text())
    return Certificates(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        server_keystore=keystore,
    )


class SecuredRedis:
    """redis-server on a TLS port only, the default user off and one ACL user."""

    def __init__(self, workdir: Path, certs: Certificates, user: str, password: str) -> None:
        self.workdir, self.certs = workdir, certs
        self.user, self.password = user, password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The address without credentials: those come from the settings under test."""
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        conf.write_text(
            f"port 0\ntls-port {self.port}\nbind 127.0.0.1\n"
            f"tls-cert-file {self.certs.server_cert}\ntls-key-file {self.certs.server_key}\n"
            f"tls-ca-cert-file {self.certs.ca}\ntls-auth-clients yes\n"
            f'save ""\nappendonly no\ndir {self.workdir}\nlogfile {self.workdir}/redis.log\n'
            "user default off\n"
            f"user {self.user} on >{self.password} ~* &* +@all\n"
        )
        self.proc = subprocess.Popen(
            [binary, str(conf)], cwd=self.workdir, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait_for_port(self.port, self.proc, 20, self.workdir / "redis.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


class SecuredKafka:
    """One KRaft broker whose client listener is SASL_SSL (PLAIN, SCRAM-SHA-256/512)."""

    def __init__(
        self, workdir: Path, certs: Certificates, users: dict[str, str], settings: Settings
    ) -> None:
        self.workdir, self.certs, self.users = workdir, certs, users
        self.lib = _kafka_lib(settings)  # the jars freshrec's local broker runs from
        self.port, self.controller_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> None:
        java = shutil.which("java")
        assert java is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        data, props = self.workdir / "data", self.workdir / "server.properties"
        log4j = self.workdir / "log4j2.properties"
        admin, admin_password = BROKER_ADMIN
        everyone = {admin: admin_password, **self.users}
        plain_users = " ".join(f'user_{u}="{p}"' for u, p in everyone.items())
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required"
        props.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}\n"
            f"listeners=SASL_SSL://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}\n"
            f"advertised.listeners=SASL_SSL://127.0.0.1:{self.port}\n"
            "controller.listener.names=CONTROLLER\ninter.broker.listener.name=SASL_SSL\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL\n"
            "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512\n"
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512\n"
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram} "
            f'username="{admin}" password="{admin_password}";\n'
            f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram};\n"
            "listener.name.sasl_ssl.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{admin}" password="{admin_password}" {plain_users};\n'
            f"ssl.keystore.type=PEM\nssl.keystore.location={self.certs.server_keystore}\n"
            f"ssl.truststore.type=PEM\nssl.truststore.location={self.certs.ca}\n"
            "ssl.client.auth=required\n"
            f"log.dirs={data}\nnum.partitions=1\noffsets.topic.replication.factor=1\n"
            "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n"
            "auto.create.topics.enable=false\ndelete.topic.enable=true\n"
        )
        log4j.write_text(
            "rootLogger.level=INFO\nrootLogger.appenderRef.file.ref=file\n"
            "appender.file.type=File\nappender.file.name=file\n"
            f"appender.file.fileName={self.workdir}/kafka.log\n"
            "appender.file.layout.type=PatternLayout\n"
            "appender.file.layout.pattern=[%d] %p %m (%c)%n\n"
        )
        common = [f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{self.lib}/*"]
        scram_users = [
            arg
            for user, password in everyone.items()
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
            for arg in ("--add-scram", f"{mechanism}=[name={user},password={password}]")
        ]
        subprocess.run(
            [java, *common, "kafka.tools.StorageTool", "format", "--standalone",
             "-t", "freshrecSecuredTest0", "-c", str(props), *scram_users],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with open(self.workdir / "kafka.out", "ab") as out:
            self.proc = subprocess.Popen(
                [java, "-Xms256m", "-Xmx512m", *common, "kafka.Kafka", str(props)],
                cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait_for_port(self.port, self.proc, timeout_s, self.workdir / "kafka.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not _port_open(f"127.0.0.1:{port}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"server on port {port} did not start: {tail}")
        time.sleep(0.05)
