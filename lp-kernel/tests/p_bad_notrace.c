// SPDX-License-Identifier: GPL-2.0
/* Mismatched: entry_SYSCALL_64 is assembly with no ftrace entry: cannot be patched. */
#include "livepatch.h"

static void new_entry(void)
{
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("entry_SYSCALL_64", new_entry)), LP_NO_SYMBOLS);
