"""A child mmdit-server for the tests in this folder (MMDIT_SERVER names the binary)."""
import os
import re
import subprocess


def start_server(model, *extra):
    """mmdit-server on `model` and a free port, once its log says SERVING: (process, port)."""
    process = subprocess.Popen(
        [os.environ["MMDIT_SERVER"], "--model", str(model), "--host", "127.0.0.1", "--port", "0",
         "--metrics_port", "-1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port, log = None, []
    for line in process.stdout:
        log.append(line)
        match = re.search(r"listening on [^ ]*:(\d+) ", line)
        if match:
            port = int(match.group(1))
        if "SERVING:" in line:
            break
    assert port, "".join(log)
    return process, port


def stop_server(process):
    process.terminate()
    assert process.wait(timeout=30) == 0
