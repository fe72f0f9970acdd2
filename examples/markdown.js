// Renders the Markdown request body to HTML with the npm package `marked`.
import { marked } from "./marked.esm.js";
const src = std.in.readAsString();
print(marked.parse(src));
