"""One procedure per stage; each module has main(argv) and is reached as `nanoseek <stage>`."""
