# Prints what must differ between two restores of one template (random.random, a random
# int, os.urandom, the clock) after reading the request, and the clock before reading it
# (the template's: the same in every restore).
import json
import os
import random
import sys
import time

before = time.time()
sys.stdin.read()
print(json.dumps({
    "random": random.random(),
    "randint": random.randint(0, 2**62),
    "urandom": os.urandom(8).hex(),
    "time": time.time(),
    "before": before,
}))
