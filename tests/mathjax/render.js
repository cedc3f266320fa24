// Reads a JSON list of TeX strings on stdin, renders each with MathJax's TeX input (the base and
// AMS packages, as GitHub's math) to MathML, and prints a JSON list of [index, error] for every
// string MathJax cannot render. An undefined macro or a bad argument is an error, not red text.
const {mathjax} = require('mathjax-full/js/mathjax.js');
const {TeX} = require('mathjax-full/js/input/tex.js');
const {STATE} = require('mathjax-full/js/core/MathItem.js');
const {liteAdaptor} = require('mathjax-full/js/adaptors/liteAdaptor.js');
const {RegisterHTMLHandler} = require('mathjax-full/js/handlers/html.js');
require('mathjax-full/js/input/tex/base/BaseConfiguration.js');
require('mathjax-full/js/input/tex/ams/AmsConfiguration.js');

const adaptor = liteAdaptor();
RegisterHTMLHandler(adaptor);
const errors = [];
let current = -1;
const tex = new TeX({
  packages: ['base', 'ams'],
  formatError: (jax, err) => { errors.push([current, err.message]); throw err; },
});
const document = mathjax.document('', {InputJax: tex});
let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  JSON.parse(input).forEach((math, k) => {
    current = k;
    try {
      document.convert(math, {display: true, end: STATE.CONVERT});  // TeX parsed to MathML, no output
    } catch (err) {
      if (!errors.length || errors[errors.length - 1][0] !== k) errors.push([k, String(err.message || err)]);
    }
  });
  process.stdout.write(JSON.stringify(errors));
});
