/* exitloop0.c — exitloop.c with no loop iterations: the fixed cost of a run, for the
 * wall-time cross-check (wall(100000 exits) - wall(0 exits)) / 100000. */
#define EXITS 0
#include "exitloop.c"
