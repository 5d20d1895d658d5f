"""``python -m watcher.kernel.features``: the probe's answers as JSON lines."""

from watcher.kernel.features.probe import main

if __name__ == "__main__":
    main()
