"""A single-node Apache Kafka (KRaft, broker+controller) assembled by Maven.

Jars come from Maven Central through ``infra/kafka/pom.xml``; the broker runs
as ``java -cp <jars>/* kafka.Kafka server.properties`` with data and logs
under ``<state>/kafka``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra import InfraError, procs
from schemas.config import Settings

POM = Path(__file__).with_name("pom.xml")
MAIN_CLASS = "kafka.Kafka"
PROC_NAME = "kafka"

Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_tool(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise InfraError(f"{tool} not found on PATH: {hint}")
    return path


class KafkaBroker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.state_dir / "kafka"
        self.data_dir = self.home / "data"
        self.log_dir = self.home / "logs"
        self.config = self.home / "server.properties"
        self.run_dir = settings.run_dir()

    # -- jars ---------------------------------------------------------------
    def jars(self, progress: Progress = _say) -> Path:
        """Resolve the broker's jars once per pom version (the first run downloads ~90 MB)."""
        jar_dir = self.settings.kafka_jar_dir
        stamp = jar_dir / ".pom-sha256"
        digest = hashlib.sha256(POM.read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest and any(jar_dir.glob("kafka_*.jar")):
            return jar_dir
        mvn = require_tool("mvn", "tokenweir resolves Apache Kafka from Maven Central with Maven "
                                  "(Debian: apt-get install maven)")
        require_tool("java", "Apache Kafka needs a Java 17+ runtime "
                             "(Debian: apt-get install openjdk-17-jre-headless)")
        if jar_dir.exists():
            shutil.rmtree(jar_dir)
        jar_dir.mkdir(parents=True)
        progress(f"resolving Apache Kafka jars with Maven into {jar_dir} "
                 "(first run downloads ~90 MB)...")
        self._maven(mvn, jar_dir, progress)
        stamp.write_text(digest)
        return jar_dir

    @staticmethod
    def _maven(mvn: str, jar_dir: Path, progress: Progress) -> None:
        cmd = [mvn, "-B", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={jar_dir}", "-DincludeScope=runtime"]
        started = time.monotonic()
        last = started
        downloads = 0
        tail: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = [*tail[-30:], line.rstrip()]
                downloads += "Downloaded from" in line
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    progress(f"  ... {downloads} artifacts downloaded, "
                             f"{last - started:.0f}s elapsed")
        if proc.returncode != 0:
            raise InfraError("Maven could not resolve Kafka:\n" + "\n".join(tail))
        progress(f"  resolved in {time.monotonic() - started:.0f}s")

    # -- lifecycle ----------------------------------------------------------
    def pid(self) -> int | None:
        return procs.running(self.run_dir, PROC_NAME)

    def write_config(self) -> None:
        s = self.settings
        self.home.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{s.kafka_controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{s.kafka_port},"
            f"CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{s.kafka_port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.data_dir.resolve()}",
            # One node: internal topics cannot have more than one replica.
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "default.replication.factor=1",
            "num.partitions=1",
            # Consumers join at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms=0",
            # Sized for 2 cores and a 512 MB heap.
            "num.network.threads=2",
            "num.io.threads=2",
            "num.recovery.threads.per.data.dir=1",
            "log.cleaner.threads=1",
            "log.cleaner.dedupe.buffer.size=8388608",
            "background.threads=2",
            "auto.create.topics.enable=false",
            # Requests may carry base64 images.
            "message.max.bytes=16777216",
            "replica.fetch.max.bytes=16777216",
            "",
        ]))
        (self.home / "log4j.properties").write_text("\n".join([
            "log4j.rootLogger=INFO, file",
            "log4j.appender.file=org.apache.log4j.RollingFileAppender",
            f"log4j.appender.file.File={(self.log_dir / 'server.log').resolve()}",
            "log4j.appender.file.MaxFileSize=20MB",
            "log4j.appender.file.MaxBackupIndex=2",
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
            "log4j.logger.kafka=INFO",
            "log4j.logger.org.apache.kafka=INFO",
            "",
        ]))

    def _java(self, jar_dir: Path, *args: str) -> list[str]:
        java = require_tool("java", "Apache Kafka needs a Java 17+ runtime "
                                    "(Debian: apt-get install openjdk-17-jre-headless)")
        heap = self.settings.kafka_heap_mb
        return [java, f"-Xmx{heap}m", f"-Xms{min(heap, 256)}m", "-XX:+UseG1GC",
                "-XX:ActiveProcessorCount=2", "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{(self.home / 'log4j.properties').resolve()}",
                f"-Dkafka.logs.dir={self.log_dir.resolve()}",
                "-cp", f"{jar_dir}/*", *args]

    def format_storage(self, jar_dir: Path) -> bool:
        """Format KRaft storage once; False when it already is."""
        if (self.data_dir / "meta.properties").exists():
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = _kafka_uuid()
        cmd = self._java(jar_dir, "kafka.tools.StorageTool", "format",
                         # One argument: an id may start with "-", which argparse
                         # would otherwise read as an option (1 run in 64 failed).
                         f"--cluster-id={cluster_id}",
                         "-c", str(self.config))
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InfraError(f"formatting Kafka storage failed:\n{done.stdout}{done.stderr}")
        return True

    async def start(self, progress: Progress = _say) -> bool:
        """Start the broker and wait until it answers; False if it was already running."""
        if self.pid() is not None:
            await self.wait_ready(self.settings.kafka_start_timeout_s)
            return False
        jar_dir = self.jars(progress)
        self.write_config()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.format_storage(jar_dir):
            progress(f"formatted KRaft storage in {self.data_dir}")
        proc = procs.spawn(self.run_dir, PROC_NAME,
                           self._java(jar_dir, MAIN_CLASS, str(self.config)),
                           log_path=self.log_dir / "stdout.log")
        progress(f"starting Kafka (pid {proc.pid}) on {self.settings.bootstrap}...")
        try:
            await self.wait_ready(self.settings.kafka_start_timeout_s, proc=proc)
        except InfraError:
            procs.stop(self.run_dir, PROC_NAME, timeout_s=5)
            raise
        return True

    async def wait_ready(self, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
                         ) -> None:
        deadline = time.monotonic() + timeout_s
        # aiokafka logs each refused connect at ERROR; while starting, those are expected.
        quiet = logging.getLogger("aiokafka")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            await self._poll_ready(deadline, proc)
        finally:
            quiet.setLevel(level)

    async def _poll_ready(self, deadline: float, proc: subprocess.Popen[bytes] | None) -> None:
        last_error = "no answer"
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise InfraError(f"Kafka exited with {proc.returncode}; see "
                                 f"{self.log_dir / 'stdout.log'}:\n{self._log_tail()}")
            try:
                await describe_cluster(self.settings.bootstrap, timeout_s=2)
                return
            except InfraError as exc:
                last_error = str(exc)
            await asyncio.sleep(0.5)
        raise InfraError(f"Kafka did not answer on {self.settings.bootstrap} in time "
                         f"({last_error}); see {self.log_dir / 'server.log'}")

    def _log_tail(self, lines: int = 20) -> str:
        path = self.log_dir / "stdout.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        # Controlled shutdown flushes logs; 30 s covers it on 2 cores.
        return procs.stop(self.run_dir, PROC_NAME, timeout_s=30)


def _kafka_uuid() -> str:
    """A Kafka cluster id: base64url of 16 random bytes, unpadded."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


async def describe_cluster(bootstrap: str, *, timeout_s: float = 5) -> dict[str, object]:
    """Metadata from the broker, or InfraError when it does not answer."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        return await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise InfraError(f"broker {bootstrap} unreachable: {exc!r}") from exc
    finally:
        await admin.close()
