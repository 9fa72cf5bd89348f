"""DVC stage `download`: its deps, params and outs are in dvc.yaml."""

from digits.stage import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("download"))
