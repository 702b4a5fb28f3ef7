/* CPython run from its shared library (libpython3.11.so), as a program that
 * embeds Python or a build with --enable-shared runs it: the interpreter's
 * code is in the library, not the program. Built by the tests against
 * Debian's libpython3.11-dev. */
#include <Python.h>

int main(int argc, char **argv)
{
    return Py_BytesMain(argc, argv);
}
