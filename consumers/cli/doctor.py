def run_checks(console, endpoint):
    return 0
