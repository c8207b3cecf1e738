"""iMaterialist (Fashion) 2019 sample: train, evaluate, detect, submit. (Work in progress.)"""
import sys

if __name__ == "__main__":
    sys.exit("fashion.py: the fashion sample is not built yet (issue 4); "
             "the mrcnn package is installed and its tests run with: python -m pytest -q tests")
