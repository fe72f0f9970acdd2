# Prints, reads its request, then fails with an uncaught exception.
import json
import sys


def parse(text):
    return json.loads(text)["missing"]


print("before the failure")
parse(sys.stdin.read())
