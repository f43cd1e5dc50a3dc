"""Command line of rcekd_train (placeholder until the drivers land)."""
import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rcekd", description="RCE-KD training drivers")
    parser.parse_args(argv)
    return 0
