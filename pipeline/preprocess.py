"""DVC stage `preprocess`: its deps, params and outs are in dvc.yaml."""

from digits.stages.runner import main

if __name__ == "__main__":
    main("preprocess")
