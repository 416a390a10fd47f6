#!/bin/sh
# Stand-in for ssh in the launcher tests: `fake_ssh.sh [options] HOST COMMAND...` ignores the
# options and the host and runs COMMAND locally with sh -c, joined by spaces as ssh does for the
# remote shell. It lets the tests run MultiNodeJob's ssh path on one machine.
while [ $# -gt 0 ]; do
  case "$1" in
    -o) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift  # the host
exec /bin/sh -c "$*"
