// Prints Math.random() and Date.now() after reading the request: two restores of one
// template must print different numbers and the current time.
std.in.readAsString();
print(JSON.stringify({ random: Math.random(), now: Date.now() }));
