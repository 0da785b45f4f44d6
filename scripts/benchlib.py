"""What the Python benchmark scripts share: the build, a `sundial local` cluster on loopback, an
HTTP request helper, and the W1-style source and dataflow they measure. Standard library only."""
import http.client, json, os, shutil, signal, socket, subprocess, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BIN=path/to/sundial measures another build (e.g. an older commit's) with the same script.
BIN = os.environ.get("BIN") or os.path.join(ROOT, "target", "release", "sundial")

# A source of (user_id, ts, amount), and count and sum per user per minute on it.
SOURCE = {"name": "tx", "time": "ts", "allowed_lateness": "5s",
          "fields": {"user_id": "u64", "ts": "i64", "amount": "i64"}}
W1 = {"name": "w1", "source": "tx", "key": "user_id",
      "features": [{"name": "n", "agg": "count", "window": {"tumbling": "1m"}},
                   {"name": "total", "agg": "sum", "field": "amount", "window": {"tumbling": "1m"}}]}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def request(conn, method, path, body=None, content_type="application/json"):
    headers = {"content-type": content_type} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, data


class Local:
    """`sundial local --workers 2 --threads 1` (release build) in a temporary data dir, with the
    source and W1 created; stopped, and its data dir removed unless KEEP=1, on exit."""

    def __enter__(self):
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True, capture_output=True)
        self.tmp = tempfile.mkdtemp()
        self.port = free_port()
        self.proc = subprocess.Popen([BIN, "local", "--workers", "2", "--threads", "1", "--data-dir",
                                      self.tmp + "/data", "--http", f"127.0.0.1:{self.port}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            self.proc.stdout.readline()
            self.api = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            assert request(self.api, "POST", "/v1/sources", json.dumps(SOURCE))[0] == 201
            assert request(self.api, "POST", "/v1/dataflows", json.dumps(W1))[0] == 201
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        # KEEP=1 keeps the data dir and the processes' logs (the path is printed).
        if os.environ.get("KEEP"):
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
