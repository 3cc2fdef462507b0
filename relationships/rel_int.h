/* Declarations shared by the files of relationships/ only. */
#ifndef FANOUT_REL_INT_H
#define FANOUT_REL_INT_H

#include "common/common.h"
#include "relationships/relationships.h"

/* Parses one binary int8 column value (network byte order). */
int64_t rel__int8_from_binary(const char *v);

/* Like rel_conn_prepare, with sql_fmt holding two %s that receive ident0 and ident1 quoted
 * by PQescapeIdentifier on each connect (identifiers from configuration are never pasted
 * into SQL unquoted). */
void rel__conn_prepare_idents(rel_conn_t *c, const char *stmt_name, const char *sql_fmt,
                              int nparams, const char *ident0, const char *ident1);

#endif
