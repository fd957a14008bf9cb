"""Repack a wheel without the parts qeval's GPU check never loads (scripts/prepare-gpu-wheels.sh):
the tree sent to the GPU machine must stay under 64 MiB. Usage: trim_wheel.py WHEEL PATTERN...
(fnmatch patterns on archive paths; RECORD lines of dropped files go too)."""
import fnmatch
import os
import sys
import zipfile

wheel, patterns = sys.argv[1], sys.argv[2:]
tmp = wheel + ".tmp"
dropped = 0
with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    drop = {i.filename for i in zin.infolist() if any(fnmatch.fnmatch(i.filename, p) for p in patterns)}
    for info in zin.infolist():
        if info.filename in drop:
            dropped += info.compress_size
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.split(b"\n")
                              if line.split(b",")[0].decode() not in drop)
        zout.writestr(info, data)
os.replace(tmp, wheel)
print(f"{os.path.basename(wheel)}: dropped {len(drop)} files, {dropped / 2**20:.1f} MiB")
