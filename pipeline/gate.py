"""DVC stage `gate`: its deps, params and outs are in dvc.yaml."""

from digits.stage import main

if __name__ == "__main__":
    main("gate")
